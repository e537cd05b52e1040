"""Engagement-lift estimators (stage 04) on sufficient statistics (`analysis.impressions.LiftData`); `report.analyse` runs them all."""
