"""Every leakage estimator on one run's inputs: the stage's report."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis.contract.art9 import ART9, label_matrix
from analysis.contract.settings import LeakageSettings
from analysis.leakage.checks import design_caveat, design_checks, negative_control_pairs
from analysis.leakage.corrected import CorrectedLeakage, CorrectedResult, assumption_checks
from analysis.leakage.curves import detector_threshold_curve, filter_threshold_curve
from analysis.leakage.data import (
    DEFAULT_CONTROLS,
    ExposureData,
    LeakageInputs,
    flag_matrix,
    iab_matrix,
    primary_nodes,
    validation_counts,
)
from analysis.leakage.exposure import (
    ExposureResult,
    ExposureTest,
    regional_exposure,
    violations,
)
from analysis.leakage.inference import ClusteredLeakRate, LeakInferenceResult, PPILeakRate, label_budget
from analysis.leakage.whitebox import LeakRateResult, WhiteBoxLeakage
from analysis.util.privacy import suppress_small_cells
from analysis.util.regions import DEFAULT_EXCLUDED, is_excluded
from analysis.util.taxonomy import category_ad_nodes


@dataclass
class LeakageReport:
    """Everything stage 03 estimates."""
    whitebox: LeakRateResult | None  # primary basis: labels when present, else detector flags
    whitebox_detector: LeakRateResult | None  # detector flags, uncorrected
    corrected: CorrectedResult | None
    by_region: pd.DataFrame | None
    exposure: ExposureResult | None
    violations: pd.DataFrame | None
    filter_curve: pd.DataFrame | None
    detector_curve: pd.DataFrame | None
    differential: pd.DataFrame | None  # Rogan-Gladen's assumption checks per category (`corrected.assumption_checks`)
    clustered: pd.DataFrame | None = None  # headline: labeled sample, user-clustered Wilson, per category x region group
    ppi: LeakInferenceResult | None = None  # PPI++ stratified by filter decision (all regions): the narrower companion
    label_budget: pd.DataFrame | None = None  # labels needed per category to show a rate below the tolerance
    settings: LeakageSettings = field(default_factory=LeakageSettings)
    notes: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # metric -> why it could not be computed (the summary says it)
    ground_truth: dict | None = None  # a simulated world's truth, attached by the stage after estimation

    def side_by_side(self, group: str = "all") -> pd.DataFrame:
        """Labels-based, raw detector and corrected leak rates with CIs (and truth) per category."""
        parts = []
        if self.whitebox is not None:
            w = self.whitebox.table
            w = w[w["region_group"] == group].set_index("category")
            parts.append(w[["n", "leak_rate", "wilson_low", "wilson_high", "cp_low", "cp_high"]].rename(columns=lambda c: f"{self.whitebox.basis}_{c}"))
        if self.clustered is not None:
            c = self.clustered[self.clustered["region_group"] == group].set_index("category")
            parts.append(c[["clusters", "ci_low", "ci_high", "verdict"]].rename(columns=lambda x: "clustered_" + x))
        if self.ppi is not None and group == "all":
            c = self.ppi.table.set_index("category")
            parts.append(c[["rate", "ci_low", "ci_high", "verdict"]].rename(columns=lambda x: "ppi_" + x))
        if self.corrected is not None:
            c = self.corrected.table[self.corrected.table["region_group"] == group].set_index("category")
            parts.append(c[["raw_rate", "raw_low", "raw_high"]].rename(columns=lambda x: "detector_" + x))
            # a row the boundary rule or an assumption check qualifies shows its one-sided bound or nothing, and why
            parts.append(c[["leak_rate", "ci_low", "ci_high", "upper_bound", "lower_bound", "status", "reason"]].rename(columns=lambda x: "corrected_" + x))
        out = pd.concat(parts, axis=1) if parts else pd.DataFrame()
        if self.whitebox is not None and "truth" in self.whitebox.table:
            w = self.whitebox.table
            out["truth"] = w[w["region_group"] == group].set_index("category")["truth"]
        out = out.reset_index()
        ncol = f"{self.whitebox.basis}_n" if self.whitebox is not None else None
        if ncol in out:
            k = self.settings.min_cell_users
            out = suppress_small_cells(out, [ncol], k=k, complementary=False)
        return out

    def summary(self) -> pd.DataFrame:
        return self.side_by_side()

    def forest(self, group: str = "all", ax=None):
        """Forest plot of the primary white-box estimate with the raw and corrected detector-based ones beside."""
        if self.whitebox is None:
            return None
        others = {}
        if self.corrected is not None:
            raw = self.corrected.table.drop(columns=["leak_rate", "ci_low", "ci_high"]).rename(
                columns={"raw_rate": "leak_rate", "raw_low": "ci_low", "raw_high": "ci_high"})
            others["detector flags, uncorrected (Wilson)"] = raw[["category", "region_group", "leak_rate", "ci_low", "ci_high"]]
            others["Rogan-Gladen (assumes non-differential detector error)"] = self.corrected.table
        if self.clustered is not None:
            others["labeled, user-clustered"] = self.clustered.rename(columns={"rate": "leak_rate"})
        if self.ppi is not None:
            others["PPI++ (detector + labels, by filter stratum)"] = self.ppi.table.assign(region_group="all").rename(columns={"rate": "leak_rate"})
        return self.whitebox.plot(ax=ax, group=group, others=others)

    def to_frame(self) -> pd.DataFrame:
        return self.whitebox.to_frame() if self.whitebox is not None else pd.DataFrame()


def analyse(inputs: LeakageInputs, settings: LeakageSettings | None = None, *, ad_nodes: dict | None = None,
            glm: bool = True) -> LeakageReport:
    """Every estimator of the stage; parts the inputs cannot support are skipped with a note. `glm=False`
    leaves out the exposure test's GLM odds ratios (reference only; simulation studies skip them)."""
    s = settings or LeakageSettings()
    alpha, tolerance, min_cell_users, n_boot, seed = s.alpha, s.leak_tolerance, s.min_cell_users, s.n_boot, s.seed
    policy_date, excluded_regions, control_topics = s.policy_date, s.excluded_regions, s.control_topics
    exposure_window_days, n_permutations = s.exposure_window_days, s.exposure_permutations
    notes, skipped = [], {}
    excluded_regions = tuple(excluded_regions) if excluded_regions else DEFAULT_EXCLUDED
    controls = dict(DEFAULT_CONTROLS if control_topics is None else control_topics)
    conv = inputs.conversations.assign(conversation_id=inputs.conversations["conversation_id"].astype(str)).set_index("conversation_id", drop=False)
    group = pd.Series(np.where(is_excluded(conv["region"], excluded_regions), "excluded", "included"), index=conv.index)
    flags = flag_matrix(inputs.categories).reindex(conv.index).fillna(False).astype(bool)
    labels = inputs.labels
    lab_member = None
    if labels is not None and len(labels):
        labels = labels.assign(conversation_id=labels["conversation_id"].astype(str))
        labels = labels[labels["conversation_id"].isin(conv.index)].drop_duplicates("conversation_id")
        lab_member = pd.DataFrame(label_matrix(labels["art9"], ART9), index=pd.Index(labels["conversation_id"], name="conversation_id"), columns=list(ART9))
    else:
        notes.append("no labeled sample: the white-box leak rate rests on detector flags alone (biased by its errors, uncorrected)")

    wb = wb_det = corr = by_region = fcurve = dcurve = diff = clus = ppi = budget = None
    fd = inputs.filter_decisions
    if fd is not None and len(fd):
        fd = fd.assign(conversation_id=fd["conversation_id"].astype(str)).drop_duplicates("conversation_id").set_index("conversation_id")
        passed = (~fd["blocked"].astype(bool)).reindex(conv.index)
        est = WhiteBoxLeakage(alpha, tolerance, min_cell_users)
        wb_det = est.fit(passed, flags, group, basis="detector")
        if lab_member is not None:
            wb = est.fit(passed, lab_member, group, basis="labels")
            by_region = est.by_region(passed, lab_member, conv["region"])
        else:
            wb = wb_det
            by_region = est.by_region(passed, flags, conv["region"])
        # stage 02's validation is out of sample (labels it did not tune on); recompute from the labels
        # only when it is missing. Either way every labeled conversation is left out of the corrected
        # counts, so the counts and the detector's error rates rest on disjoint conversations.
        val = inputs.validation
        if val is None and lab_member is not None:
            val = validation_counts(flags, labels)
            notes.append("no detector_validation.parquet: detector error rates computed on labels.parquet "
                         "(optimistic if the detector was tuned on those labels)")
        if lab_member is not None:  # what the labels can say against Rogan-Gladen's assumptions: rejected ones withhold it
            diff = assumption_checks(passed, flags, labels, alpha)
        if val is not None:
            corr = CorrectedLeakage(alpha, n_boot, seed, min_cell_users).fit(
                passed, flags, val, group, exclude=pd.Index(labels["conversation_id"]) if labels is not None else None, checks=diff)
        else:
            notes.append("no detector validation counts and no labels: misclassification correction skipped")
        if lab_member is not None:
            clus, ppi, budget = _cluster_aware(passed, lab_member, conv, group, inputs.categories, s, notes)
        if "score" in fd and fd["score"].notna().any():
            fcurve = filter_threshold_curve(fd["score"].reindex(conv.index), lab_member if lab_member is not None else flags, alpha=alpha)
        score_cols = [f"score_{c}" for c in ART9]
        if lab_member is not None and all(c in inputs.categories for c in score_cols):
            sc = inputs.categories.assign(conversation_id=inputs.categories["conversation_id"].astype(str)).set_index("conversation_id")[score_cols]
            sc.columns = list(ART9)
            dcurve = detector_threshold_curve(passed, sc.reindex(conv.index), labels, group, alpha=alpha, n_boot=min(n_boot, 1000), seed=seed)
    else:
        notes.append("no filter decisions: white-box leak rates skipped (black-box exposure test only)")
        skipped["leak_rate"] = "no filter decisions: the white-box leak rate needs them"

    exp = viol = None
    if inputs.impressions is not None and len(inputs.impressions):
        data = ExposureData.build(inputs.impressions, inputs.users, excluded_regions=excluded_regions, policy_date=policy_date)
        nodes = category_ad_nodes(ad_nodes)
        member = pd.concat([flags, iab_matrix(inputs.categories, controls).reindex(conv.index).fillna(False).astype(bool)], axis=1)
        if member.shape[1] == len(ART9):
            notes.append("conversation categories carry no iab_ids: positive controls skipped")
        kinds = {**{c: "sensitive" for c in ART9}, **{c: "control" for c in controls}}
        all_nodes = {**nodes, **controls}
        # negative controls: each category's conversations against an ad node chat targeting cannot move
        neg = negative_control_pairs({c: all_nodes[c] for c in member.columns}, pd.Series(np.bincount(data.node, minlength=len(data.nodes)),
                                     index=data.nodes), _conversation_nodes(inputs.categories))
        member = pd.concat([member, pd.DataFrame({name: member[c] for name, (c, _) in neg.items()}, index=member.index)], axis=1)
        kinds |= {name: "negative_control" for name in neg}
        all_nodes |= {name: [n] for name, (_, n) in neg.items()}
        test = ExposureTest(exposure_window_days, n_permutations, alpha, max(20, min_cell_users), seed, glm=glm)
        exp = test.fit(data, conv.reset_index(drop=True), member, all_nodes, kinds)
        real = [c for c in member.columns if kinds.get(c) != "negative_control"]
        try:  # the same test before the policy date, where no chat -> ad flow exists
            plc = test.fit(data, conv.reset_index(drop=True), member[real], all_nodes, kinds, placebo=True)
            exp.table = pd.concat([exp.table, plc.table], ignore_index=True)
        except ValueError as e:
            notes.append(f"exposure placebo skipped: {e}")
        if not neg:
            notes.append("no ad node qualifies as a negative control (all lie near a category or a conversation's topic)")
        regional = regional_exposure(data, conv.reset_index(drop=True), primary_nodes(inputs.categories),
                                     window_days=exposure_window_days, n_permutations=n_permutations, alpha=alpha,
                                     min_users=max(20, min_cell_users), seed=seed)
        exp.table = pd.concat([exp.table, regional], ignore_index=True)
        exp.checks = design_checks(exp.table, alpha, min_p=1 / (n_permutations + 1))
        exp.caveat = design_caveat(exp.checks)
        notes.append(f"black-box exposure design: {exp.caveat}")
        viol = violations(data, exp, min_cell=min_cell_users, alpha=alpha)
        if viol.attrs["underpowered"]:
            notes.append("violation check: " + viol.attrs["family"].split(". ", 1)[1])
        if not is_excluded(inputs.users["region"], excluded_regions).any():
            skipped["violation_impressions"] = "no users in excluded regions: the promise there cannot be checked"
        elif data.chat is None:
            viol["chat_impressions"] = np.nan  # unknown, not zero
            skipped["violation_impressions"] = "no targeting_sources: chat-targeted impressions cannot be told apart"
            notes.append("no targeting_sources in the impressions: violations rest on the exposure test alone")
    else:
        notes.append("no impressions: black-box exposure test and violation check skipped")
        skipped["exposure_effect"] = skipped["violation_impressions"] = "no impressions: the exposure test and the violation check need an ad log"
    return LeakageReport(wb, wb_det, corr, by_region, exp, viol, fcurve, dcurve, diff, clus, ppi, budget, s, notes, skipped)


def _cluster_aware(passed: pd.Series, lab_member: pd.DataFrame, conv: pd.DataFrame, group: pd.Series, categories: pd.DataFrame,
                   s: LeakageSettings, notes: list[str]):
    """The leak rates: the labeled sample with users as clusters (per region group; the headline), PPI++
    from the detector's scores plus the labels (stratified by filter decision; narrower, but out of the
    [0.93, 0.97] coverage band in 4 of 21 adversarial cells, docs/leakage.md), and the label budget of each."""
    ids = lab_member.index
    p_lab = passed.reindex(ids)
    ok = p_lab.notna().to_numpy()
    users = conv["user_id"].astype(str)
    rows = []
    est = ClusteredLeakRate(s.alpha, s.leak_tolerance)
    for g in ("all", "included", "excluded"):
        m = ok & ((group.reindex(ids) == g).to_numpy() if g != "all" else True)
        if not m.any():
            continue
        t = est.fit(p_lab.to_numpy()[m].astype(bool), lab_member.to_numpy()[m], users.reindex(ids).to_numpy()[m], categories=list(lab_member.columns)).table
        rows.append(t.assign(region_group=g))
    clus = pd.concat(rows, ignore_index=True) if rows else None
    ppi = None
    score_cols = [f"score_{c}" for c in lab_member.columns]
    if all(c in categories for c in score_cols):
        sc = categories.assign(conversation_id=categories["conversation_id"].astype(str)).drop_duplicates("conversation_id").set_index("conversation_id")
        sc = sc[score_cols].reindex(conv.index)
        keep = passed.notna().to_numpy() & sc.notna().all(axis=1).to_numpy()
        labeled = conv.index.isin(ids)
        y = lab_member.reindex(conv.index).fillna(False).to_numpy(bool)
        try:
            ppi = PPILeakRate(s.alpha, s.leak_tolerance).fit(passed.to_numpy()[keep].astype(bool), y[keep], labeled[keep],
                                                              sc.to_numpy(float)[keep].clip(0, 1), users.to_numpy()[keep],
                                                              categories=list(lab_member.columns))
        except ValueError as e:
            notes.append(f"PPI leak rates skipped: {e}")
    else:
        notes.append("conversation categories carry no score_<category> columns: PPI leak rates skipped")
    budget = None
    if clus is not None:
        a = clus[clus["region_group"] == "all"].set_index("category")
        prev = lab_member.mean().reindex(a.index).to_numpy()
        # one row per category and basis: the headline's (labels only; variance factor = the design effect of
        # user clustering) and, when PPI++ ran, its own (variance factor measured on this run: the detector's
        # quality times user clustering), so the summary can say what the detector's scores would save
        bases = [("labels only (design effect)", a["rate"], a["deff"])]
        if ppi is not None:
            pt = ppi.table.set_index("category").reindex(a.index)
            bases.append(("PPI++ (detector + labels)", pt["rate"], pt["variance_factor"].fillna(a["deff"])))
        budget = pd.concat([pd.DataFrame({
            "category": a.index, "rate": rate.to_numpy(float), "prevalence": prev, "labels_now": len(ids),
            "design_effect": a["deff"].to_numpy(float), "variance_factor": vf.to_numpy(float), "basis": basis,
        }) for basis, rate, vf in bases], ignore_index=True)
        budget["labels_needed"] = [label_budget(r, s.leak_tolerance, max(p, 1e-9), variance_factor=v, alpha=s.alpha)
                                   if pd.notna(r) else np.nan for r, p, v in zip(budget["rate"], budget["prevalence"], budget["variance_factor"])]
    return clus, ppi, budget


def _conversation_nodes(categories: pd.DataFrame) -> set[str]:
    """Every IAB id stage 02 gave any conversation (`iab_ids` lists or an `iab_id` column)."""
    col = next((c for c in ("iab_ids", "iab_id", "iab") if c in categories), None)
    if col is None:
        return set()
    out: set[str] = set()
    for v in categories[col]:
        if isinstance(v, (list, tuple, set, np.ndarray)):
            out.update(map(str, v))
        elif isinstance(v, str) and v:
            out.add(v)
    return out
