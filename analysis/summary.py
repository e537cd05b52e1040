"""Stage 05: the stakeholder summary, and figure helpers shared by the stage notebooks.

Every number in the summary's prose is read from the stage outputs of the run (`metrics/*.json`
and `data/*.parquet`), never typed by hand. A question whose stage did not run is reported as
not assessed, not guessed.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis.contract import metric_names as M
from analysis.contract.art9 import SUMMARY_NAMES
from analysis.contract.rundir import RunDir
from analysis.contract.settings import SummarySettings
from analysis.contract.stages import LEAKAGE, LIFT, STAGES, SUMMARY, describe
from analysis.util.metrics import read_metrics
from analysis.util.privacy import scrub_pii
from analysis.util.taxonomy import load_taxonomy

# what the answers headline (issue 14): inference at the unit of assignment / clustering
HEADLINE_METRICS = (M.LEAK_RATE_CLUSTERED, M.REGION_DID_REL, M.AB_CUPED_REL)
METRIC_LABELS = {
    M.LEAK_RATE_PPI: "Leak rate (PPI++)",
    M.LEAK_RATE_CLUSTERED: "Leak rate (labeled sample, users as clusters)",
    M.LEAK_RATE: "Leak rate (labeled sample)",
    M.REGION_DID_REL: "Lift, included regions after the policy (DiD over regions)",
    M.AB_CUPED_REL: "Lift, treatment vs holdout (randomized, CUPED)",
    M.DID_REL: "Lift, included regions after the policy (DiD, users as clusters)",
    M.AB_REL: "Lift, treatment vs holdout (randomized)",
}


def _quoted(label: str) -> str:
    """A label holding commas reads as one item of a list only in quotes."""
    return f"“{label}”" if "," in label else label


QUESTIONS = {
    "topics": "What do people talk about with the AI?",
    "ad_categories": "Which ad categories do those topics feed?",
    "leakage": "Do sensitive conversations leak past the filter into ad targeting?",
    "lift": "Does chat-based personalization lift engagement?",
}


def pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None or pd.isna(x) else f"{100 * x:.{digits}f}%"


def ci_text(lo, hi, digits: int = 1) -> str:
    if lo is None or hi is None or pd.isna(lo) or pd.isna(hi):
        return "CI not available"
    return f"95% CI {100 * lo:.{digits}f}–{100 * hi:.{digits}f}%"


@dataclass
class Answer:
    key: str
    question: str
    sentence: str
    assessed: bool
    source: str  # the stage output the numbers come from


class AuditSummary:
    """The four audit questions answered from one run's stage outputs."""

    def __init__(self, run_dir: str | Path | RunDir, settings: SummarySettings | None = None):
        self.rd = RunDir.of(run_dir)
        self.run_dir = self.rd.root
        self.settings = settings or SummarySettings()
        self.tolerance = self.settings.leak_tolerance
        self.k = self.settings.min_cell_users
        self.metrics = read_metrics(self.rd)

    # -------------------------------------------------------------------- helpers
    def _enough_users(self, frame: pd.DataFrame) -> pd.DataFrame:
        """The rows of a metrics frame whose group does not name fewer than k users as clusters: an
        estimate resting on fewer than k users is neither named, plotted nor tabled (small cells)."""
        if not len(frame):
            return frame
        n = frame["group"].map(lambda g: (g or {}).get("clusters"))
        return frame[n.isna() | (n.fillna(0) >= self.k)]

    def _m(self, stage: str, metric: str, **group) -> pd.DataFrame:
        m = self.metrics
        if not len(m):
            return m
        sel = m[(m["stage"] == stage) & (m["metric"] == metric)]
        for k, v in group.items():
            sel = sel[sel["group"].map(lambda g: (g or {}).get(k) == v)]
        return sel

    def stages_run(self) -> list[str]:
        return sorted(self.metrics["stage"].unique()) if len(self.metrics) else []

    # -------------------------------------------------------------------- answers
    def _users_per(self, table: pd.DataFrame, column: str) -> pd.Series | None:
        """Distinct users per value of `column` of a per-conversation table (stage 00's user ids), or
        None without stage 00's conversations: the small-cell rule counts people, not conversations."""
        if not self.rd.conversations.exists():
            return None
        users = pd.read_parquet(self.rd.conversations, columns=["conversation_id", "user_id"])
        return table[["conversation_id", column]].merge(users, on="conversation_id").groupby(column)["user_id"].nunique()

    def _named_topics(self, info: pd.DataFrame) -> tuple[pd.DataFrame, str]:
        """Stage 01's topics (`info`, outliers excluded), largest first, of at least k users (k
        conversations when user ids are missing), with the name a reader sees: stage 02's readable
        name (its readable label without the tier-1 tail) when stage 02 ran, else stage 01's; and the source of those names."""
        real = info[info["topic"] != -1].sort_values("size", ascending=False)
        users = self._users_per(pd.read_parquet(self.rd.topics), "topic") if self.rd.topics.exists() else None
        real = real[real["topic"].map(users).fillna(0) >= self.k] if users is not None else real[real["size"] >= self.k]
        name = real["label"].astype(str)
        src = "01_topics: data/topic_info.parquet"
        if self.rd.topic_categories.exists():
            tc = pd.read_parquet(self.rd.topic_categories)
            if "readable_name" in tc:
                readable = tc.set_index(tc["topic"].astype(str))["readable_name"].dropna().astype(str)
                name = real["topic"].astype(str).map(readable).map(scrub_pii, na_action="ignore").fillna(name)
                src += ", 02_ad_mapping: data/topic_categories.parquet (readable labels)"
        return real.assign(name=name), src

    def answer_topics(self) -> Answer:
        q, src = QUESTIONS["topics"], "01_topics: data/topic_info.parquet"
        if not self.rd.topic_info.exists():
            return _not_run("topics", q, "topics", "01", src)
        t = pd.read_parquet(self.rd.topic_info)
        named, src = self._named_topics(t)
        parts = [f"{_quoted(r.name)} ({pct(r.share)})" for r in named.head(3).itertuples()]
        outl = t.loc[t["topic"] == -1, "share"].sum()
        s = (
            f"Across {int(t['size'].sum()):,} conversations the analysis found {int((t['topic'] != -1).sum())} topics; the most common were "
            + _join(parts)
            + (f", and {pct(outl)} of conversations fit no topic." if outl > 0 else ".")
        )
        return Answer("topics", q, s, True, src)

    def answer_ad_categories(self) -> Answer:
        q, src = QUESTIONS["ad_categories"], "02_ad_mapping: data/conversation_categories.parquet"
        p = self.rd.conversation_categories
        if not p.exists():
            return _not_run("ad_categories", q, "ad-mapping", "02", src)
        c = pd.read_parquet(p)
        # each conversation's own tier-1 (issue 16); runs from before it carry only their topic's
        col = "conv_tier1_id" if "conv_tier1_id" in c else "tier1_id"
        names = load_taxonomy().set_index("id")["label"]
        cat = c[col].map(names).fillna("no ad category") if col in c else pd.Series("no ad category", index=c.index)
        shares = cat.value_counts(normalize=True)
        users = self._users_per(c, col) if col in c else None
        size = users.rename(index=names) if users is not None else cat.value_counts()  # conversations without user ids
        mapped = shares[shares.index.isin(size.index[size >= self.k])].drop("no ad category", errors="ignore")
        parts = [f"{name} ({pct(v)})" for name, v in mapped.head(3).items()]
        subject = "By each conversation's own category, chats" if col == "conv_tier1_id" else "Chat topics"
        s = f"{subject} feed mostly the IAB categories " + _join(parts)
        s += f"; {pct(shares.get('no ad category', 0.0))} of conversations fit no ad category." if "no ad category" in shares else "."
        return Answer("ad_categories", q, s, True, src)

    def _ran(self, stage: str) -> bool:
        """The stage wrote its metrics in this run (it ran, whatever it could estimate)."""
        return self.rd.metrics_file(stage).exists()

    def _why(self, stage: str, metric: str) -> str | None:
        """Why the stage could not compute `metric` (its "not computed" record), or None."""
        sel = self._m(stage, metric)
        sel = sel[sel["estimate"].isna() & sel["note"].notna()] if len(sel) else sel
        return str(sel["note"].iloc[0]).removeprefix("not computed: ") if len(sel) else None

    def answer_leakage(self) -> Answer:
        q, src = QUESTIONS["leakage"], "03_leakage: metrics/03_leakage.json (leak_rate, violation_impressions)"
        if not self._ran(LEAKAGE):
            return _not_run("leakage", q, "leakage", "03", src)
        lr = self._m(LEAKAGE, M.LEAK_RATE)
        lr = lr[lr["estimate"].notna()] if len(lr) else lr
        parts, assessed = [], False
        headline = self._leak_sentence_clustered()
        if headline:
            assessed = True
            parts.append(headline)
            src = f"03_leakage: metrics/03_leakage.json ({M.LEAK_RATE_CLUSTERED}, {M.LEAK_UPPER_BOUND}, {M.LABEL_BUDGET}, violation_impressions)"
        elif len(lr):
            assessed = True
            lr = lr[lr["group"].map(lambda g: g.get("region_group", "all") in ("all", "included"))]
            lr = lr.assign(category=lr["group"].map(lambda g: g.get("category"))).drop_duplicates("category")
            worst = lr.sort_values("estimate", ascending=False).iloc[0]
            name = SUMMARY_NAMES.get(worst["category"], worst["category"])
            s = (
                f"{name} conversations passed the filter {pct(worst['estimate'])} of the time "
                f"({ci_text(worst['ci_low'], worst['ci_high'])}), the highest of the {_count(len(lr))} sensitive categories with data; "
            )
            holm = self._m(LEAKAGE, M.TOLERANCE_P_HOLM, region_group="all")
            holm = holm[holm["estimate"].notna()] if len(holm) else holm
            if len(holm):  # the stage's one-sided exact tests against the tolerance, Holm-adjusted across categories
                holm = holm.assign(category=holm["group"].map(lambda g: g.get("category"))).drop_duplicates("category")
                s += (
                    f"{int((holm['estimate'] < 0.05).sum())} of {len(holm)} categories leak significantly more than the "
                    f"{pct(self.tolerance, 0)} tolerance (one-sided exact test, Holm-adjusted, α = 0.05)."
                )
            else:
                above = lr[lr["ci_low"] > self.tolerance]
                s += f"{len(above)} of {len(lr)} categories leak more than the {pct(self.tolerance, 0)} tolerance (95% CI above it)."
            parts.append(s)
        else:
            why = self._why(LEAKAGE, M.LEAK_RATE) or "no sensitive conversation has a filter decision"
            parts.append(f"The leak rate past the filter could not be estimated in this run ({why}).")
        design = self._exposure_design()
        viol = self._m(LEAKAGE, M.VIOLATION_IMPRESSIONS)
        why = self._why(LEAKAGE, M.VIOLATION_IMPRESSIONS)
        viol = viol[viol["estimate"].notna()] if len(viol) else viol
        if why is not None:
            parts.append(f"Whether the excluded regions (EU/EEA, UK, South Korea) are untouched could not be checked ({why}).")
        elif len(viol):
            assessed = True
            # "ALL excluded" is the total: summing it with the per-region rows would count every impression twice
            total_row = viol[viol["group"].map(lambda g: (g or {}).get("region") == "ALL excluded")]
            total = int(total_row["estimate"].iloc[0]) if len(total_row) else int(np.nansum(viol["estimate"].astype(float)))
            parts.append(
                f"In the excluded regions (EU/EEA, UK, South Korea), {total:,} impressions carried a chat-derived signal: a violation of the promise."
                if total > 0
                else "No chat-derived ad signal was found in the excluded regions."
            )
        flags = self._m(LEAKAGE, M.VIOLATION_FLAG)
        flagged = flags[(flags["estimate"] == 1) & flags["group"].map(lambda g: (g or {}).get("region") != "ALL excluded")] if len(flags) else flags
        by_exposure = [g["region"] for g in flagged["group"]] if len(flagged) and not (len(viol) and int(np.nansum(viol["estimate"].astype(float)))) else []
        if design == "failed":
            parts.append("The black-box exposure test failed its pre-policy placebo or negative-control check: exposure to a topic's ads "
                         "rose after conversations where no chat could have caused it, so its detections"
                         + (f" (including the flags of {_join(by_exposure)})" if by_exposure else "")
                         + " cannot be told apart from interest that comes from outside the chat and are not reported as leakage.")
        elif by_exposure:
            assessed = True
            parts.append(f"The black-box exposure test flags {_join(by_exposure)}: ads there follow conversation topics"
                         + (" (its placebo and negative controls were null), though it cannot tell chat flow from outside interest that "
                            "began with the policy date." if design == "passed" else
                            ", but its design could not be checked (no placebo or negative control ran), so this may be interest "
                            "from outside the chat."))
        return Answer("leakage", q, " ".join(parts), assessed, src)

    def _exposure_design(self) -> str | None:
        """'failed' when a placebo / negative-control check of the black-box design failed, 'passed' when all
        that ran passed, None when none ran."""
        c = self._m(LEAKAGE, M.EXPOSURE_CHECK)
        if not len(c):
            return None
        v = c["group"].map(lambda g: (g or {}).get("verdict"))
        return "failed" if (v == "failed").any() else ("passed" if (v == "passed").any() else None)

    def _leak_sentence_clustered(self) -> str | None:
        """The leak rates whose intervals hold when a filter's misses cluster by user and the detector errs
        where the filter errs (the labeled sample, users as clusters), and the compliance verdict of each
        category's one-sided upper bound against the tolerance. PPI++ (detector scores + labels) is narrower
        but fell to 0.92 coverage in some categories of adversarial worlds (docs/leakage.md): not headlined."""
        lr = self._m(LEAKAGE, M.LEAK_RATE_CLUSTERED, region_group="all")
        lr = lr[lr["estimate"].notna()] if len(lr) else lr
        if not len(lr):
            return None
        lr = lr.assign(category=lr["group"].map(lambda g: g.get("category"))).drop_duplicates("category")
        shown = self._enough_users(lr)
        if not len(shown):
            s = (f"No sensitive category has labeled conversations from at least {self.k} users, so no leak rate is shown here "
                 "(small cells are suppressed).")
        else:
            worst = shown.sort_values("estimate", ascending=False).iloc[0]
            name = SUMMARY_NAMES.get(worst["category"], worst["category"])
            n_users = (worst["group"] or {}).get("clusters")
            s = (
                f"{name} conversations passed the filter {pct(worst['estimate'])} of the time "
                f"({ci_text(worst['ci_low'], worst['ci_high'])}; labeled sample" + (f", {int(n_users):,} users as clusters" if n_users else "")
                + f"), the highest of the {_count(len(shown))} sensitive categories with data"
                + (f" from at least {self.k} users." if len(shown) < len(lr) else ".")
            )
        ub = self._m(LEAKAGE, M.LEAK_UPPER_BOUND)
        ub = ub[ub["estimate"].notna() & ub["group"].map(lambda g: g.get("basis") == M.BOUND_BASIS_CLUSTERED)] if len(ub) else ub
        if len(ub):
            v = ub["group"].map(lambda g: g.get("verdict")).value_counts()
            below, neither = int(v.get("shown below", 0)), int(v.get("not shown to exceed", 0))
            s += (
                f" Against the {pct(self.tolerance, 0)} tolerance (one-sided 95% bounds): {int(v.get('exceeds', 0))} of {len(ub)} categories "
                f"exceed it, {below} {_are(below)} shown below it, and {neither} {_are(neither)} "
                "neither shown below it nor shown to exceed it."
            )
            open_ = set(ub[ub["group"].map(lambda g: g.get("verdict")) == "not shown to exceed"]["group"].map(lambda g: g.get("category")))
            budget = self._m(LEAKAGE, M.LABEL_BUDGET)
            if len(budget) and open_:
                budget = budget[budget["group"].map(lambda g: g.get("category") in open_)]
                basis = budget["group"].map(lambda g: g.get("basis", ""))
                labels_only = budget[basis.str.startswith("labels only")]
                with_scores = budget[basis.str.startswith("PPI++")]
                on_labels = len(labels_only) > 0  # the labels-only plan leads when there is one; PPI++ is its companion
                main, other = (labels_only, with_scores) if on_labels else (with_scores, labels_only)
                reachable = main[main["estimate"].notna()]
                cat = lambda frame: sorted({g["category"].replace("_", " ") for g in frame["group"]})  # noqa: E731
                # the planner has no budget for a category whose estimate is at or above the tolerance
                above = sorted(set(cat(main)) - set(cat(reachable)))
                if len(reachable):
                    s += (f" At the current estimates, showing {_join(cat(reachable))} below the tolerance would take about"
                          f" {_about(reachable['estimate'].max())} labeled conversations")
                    extra = other["estimate"].dropna()
                    if on_labels and len(extra):
                        s += f" ({_about(extra.max())} with the detector's scores, PPI++)"
                    elif not on_labels:
                        s += " (with the detector's scores, PPI++)"
                    s += "."
                if above:
                    s += (f" {_join(above).capitalize()} cannot be shown below it: {'its estimate lies' if len(above) == 1 else 'their estimates lie'}"
                          " at or above the tolerance.")
        return s

    def answer_lift(self) -> Answer:
        q, src = QUESTIONS["lift"], "04_engagement_lift: metrics/04_engagement_lift.json"
        if not self._ran(LIFT):
            return _not_run("lift", q, "engagement-lift", "04", src)
        did = self._m(LIFT, M.REGION_DID_REL)
        did = did[did["estimate"].notna()] if len(did) else did
        region_level = len(did) > 0
        if not region_level:
            did = self._m(LIFT, M.DID_REL)
            did = did[did["estimate"].notna()] if len(did) else did
        parts, assessed = [], False
        if len(did):
            assessed = True
            d = did.iloc[0]
            sig = d["ci_low"] > 0 or d["ci_high"] < 0
            g = d["group"] or {}
            how = (f"difference-in-differences with {g.get('regions_included')} included and {g.get('regions_excluded')} excluded "
                   "regions as clusters, observational" if region_level else "difference-in-differences, observational")
            s = (
                f"After the policy date, click-through in included regions changed by {_signed_pct(d['estimate'])} "
                f"({ci_text(d['ci_low'], d['ci_high'])}) relative to excluded regions ({how})"
            )
            s += ", a statistically significant lift." if sig and d["estimate"] > 0 else (", a significant drop." if sig else ", not distinguishable from no effect.")
            pt = self._m(LIFT, M.PRETREND_P)
            pt = pt[pt["estimate"].notna()] if len(pt) else pt
            if len(pt) and pt["estimate"].iloc[0] < 0.05:  # parallel trends fail: the DiD cannot hold, so it is not the answer
                s = (f"Included and excluded regions already trended apart before the policy date (pre-trend test over regions, "
                     f"p = {pt['estimate'].iloc[0]:.3f}), so the difference-in-differences cannot attribute a change to the policy "
                     f"(it gives {_signed_pct(d['estimate'])}, {ci_text(d['ci_low'], d['ci_high'])}, shown in stage 04 only).")
            parts.append(s)
        else:
            parts.append(f"The difference-in-differences could not be estimated in this run ({self._why(LIFT, M.DID_REL) or 'no estimate'}).")
        ab = self._m(LIFT, M.AB_CUPED_REL)
        ab = ab if len(ab) and ab["estimate"].notna().any() else self._m(LIFT, M.AB_REL)
        ab = ab[ab["estimate"].notna()] if len(ab) else ab
        if len(ab):
            assessed = True
            a = ab.iloc[0]
            how = "CUPED-adjusted for pre-period click-through" if a["metric"].startswith("ab_cuped") else "unadjusted"
            parts.append(f"The randomized holdout comparison gives {_signed_pct(a['estimate'])} ({ci_text(a['ci_low'], a['ci_high'])}; {how}).")
        elif not assessed and self._why(LIFT, M.AB_REL):
            parts.append(f"No randomized holdout comparison either ({self._why(LIFT, M.AB_REL)}).")
        return Answer("lift", q, " ".join(parts), assessed, src)

    def answers(self) -> list[Answer]:
        return [self.answer_topics(), self.answer_ad_categories(), self.answer_leakage(), self.answer_lift()]

    def to_frame(self) -> pd.DataFrame:
        return pd.DataFrame([a.__dict__ for a in self.answers()])

    def summary(self) -> pd.DataFrame:
        """One row per question: the answer sentence, whether it was assessed, its source."""
        return self.to_frame()

    def stages_text(self) -> str:
        """Which stages ran in this run and which did not (a stage that ran may still have skipped parts)."""
        ran = [s for s in STAGES if s != SUMMARY and self._ran(s)]
        missing = [s for s in STAGES if s != SUMMARY and not self._ran(s)]
        text = "Stages run: " + ", ".join(describe(s) for s in ran) + "." if ran else "No analysis stage ran."
        return text + (" Not run: " + ", ".join(describe(s) for s in missing) + "." if missing else "")

    def to_markdown(self) -> str:
        """Markdown: which stages ran, then each question in bold and its one-sentence answer."""
        answers = "\n\n".join(f"**{i}. {a.question}**<br>\n<span class=\"audit-answer\">{a.sentence}</span>" for i, a in enumerate(self.answers(), 1))
        return f"*{self.stages_text()}*\n\n" + answers

    # ------------------------------------------------------------------ evidence
    def estimates_vs_truth(self, *, headline: bool = True) -> pd.DataFrame:
        """Estimates that have a known truth (simulated worlds), with coverage. `headline` keeps the
        all-region, all-category figures the answers rest on (HEADLINE_METRICS when the run has them; the
        comparisons, e.g. Rogan-Gladen and the user-clustered DiD, and per-region / per-ad-category rows
        are in the stage reports)."""
        t = self._truth_rows(headline)
        t["group"] = t["group"].map(lambda g: ", ".join(f"{k}={v}" for k, v in (g or {}).items()))
        return t

    def truth_table(self) -> pd.DataFrame:
        """estimates_vs_truth() as a stakeholder reads it: what was estimated, the estimate with its 95% CI
        and the planted truth in percent, and whether the interval holds the truth."""
        t = self._truth_rows(headline=True)
        what = [METRIC_LABELS.get(met, met) + (f", {c.replace('_', ' ')}" if (c := (g or {}).get("category")) else "")
                for met, g in zip(t["metric"], t["group"])]
        return pd.DataFrame({
            "estimate": [pct(x) for x in t["estimate"]],
            "95% CI": [f"{100 * lo:.1f}–{100 * hi:.1f}%" for lo, hi in zip(t["ci_low"], t["ci_high"])],
            "truth": [pct(x) for x in t["truth"]],
            "CI holds the truth": ["yes" if c else "no" for c in t["covers_truth"]],
        }, index=pd.Index(what, name="estimated"))

    def _truth_rows(self, headline: bool) -> pd.DataFrame:
        cols = ["stage", "metric", "group", "estimate", "ci_low", "ci_high", "truth", "covers_truth"]
        m = self.metrics
        t = m[m["truth"].notna() & m["ci_low"].notna()].copy() if len(m) else m
        if not len(t):  # a real dataset: no metric carries a truth
            return pd.DataFrame(columns=cols)
        if headline and t["metric"].isin(HEADLINE_METRICS).any():
            t = t[t["metric"].isin(HEADLINE_METRICS)]
        if headline:
            keep = t["group"].map(lambda g: not ({"region", "ad_category"} & set(g or {})) and (g or {}).get("region_group", "all") == "all")
            t = self._enough_users(t[keep])
        t["covers_truth"] = (t["ci_low"] <= t["truth"]) & (t["truth"] <= t["ci_high"])
        return t[cols].reset_index(drop=True)

    def headline_leak_metric(self) -> str:
        """The leak-rate estimator the answers headline: the user-clustered labeled sample, else (a run
        from before it existed) the labeled sample's Wilson rate."""
        sel = self._m(LEAKAGE, M.LEAK_RATE_CLUSTERED)
        return M.LEAK_RATE_CLUSTERED if len(sel) and sel["estimate"].notna().any() else M.LEAK_RATE

    def caveats(self) -> list[str]:
        out = []
        if len(self._m(LIFT, M.DID_REL)) or len(self._m(LIFT, M.REGION_DID_REL)):
            out.append(
                "The difference-in-differences is observational: it assumes included and excluded regions would have trended alike "
                "(in relative terms) without the policy; the pre-trend test over regions is shown in stage 04. Its interval treats "
                "regions, not users, as the units, because the policy was switched on by region."
            )
        if len(self._m(LIFT, M.CATEGORY_REL_LIFT)):
            out.append(
                "Per-ad-category lifts compare chat-targeted with other impressions of the same category: associations, not "
                "effects, and not headlined here (stage 04 lists them with their own caveat)."
            )
        if len(self._m(LIFT, M.AB_REL)):
            out.append("The holdout comparison is randomized (users assigned to arms), and is the stronger evidence on lift.")
        ri = self._m(LIFT, M.REGION_RI_P)
        ri = ri if len(ri) else self._m(LIFT, M.RANDOMIZATION_P)
        if len(ri):
            n = ri.iloc[0]["n"]
            out.append(
                f"Inference over regions rests on {int(n) if pd.notna(n) else 'few'} region clusters: intervals are wide and the "
                "randomization p-value is coarse; regions were not assigned at random, so it treats the assignment as if they were."
            )
        design = self._exposure_design()
        if design == "failed":
            out.append("The black-box exposure test's pre-policy placebo or negative controls were not null: its detections are "
                       "not evidence of leakage (interest from outside the chat, seen through other signals, would look the same).")
        elif design == "passed":
            out.append("The black-box exposure test passed its pre-policy placebo and negative-control checks; it still cannot tell "
                       "chat flow from outside interest that begins with the policy date itself.")
        if len(self._m(LEAKAGE, M.LEAK_RATE_CLUSTERED)):
            out.append(
                "Leak rates are estimated from the labeled sample with users as clusters: valid for a random labeled sample, "
                "also when a filter's misses cluster by user. PPI++, which adds the detector's scores within each filter "
                "decision, gives narrower intervals (stage 03) but fell short of 95% coverage for some categories in validation "
                "studies built to break it, so it is not the headline."
            )
        elif len(self._m(LEAKAGE, M.LEAK_RATE_CORRECTED)):
            out.append(
                "Where sensitivity is detected by our classifier rather than labeled, leak rates are corrected for the "
                "detector's measured error (Rogan–Gladen, which assumes it errs alike among passed and blocked conversations)."
            )
        out.append(f"Counts describing fewer than {self.k} users are suppressed; no transcript text or user id appears in this report.")
        if self.rd.exists("ground_truth"):
            out.append("This run audits a simulated world: estimates are shown beside the simulator's ground truth.")
        return out

    # ------------------------------------------------------------------- figures
    def fig_estimates(self, stage: str, metrics: list[str], *, label_key: str | None = None, title: str = "", **group):
        """Forest plot of a stage's estimates with their 95% CIs (and truths when known); small cells
        are not drawn (`_enough_users`)."""
        m = self.metrics
        sel = m[(m["stage"] == stage) & m["metric"].isin(metrics) & m["ci_low"].notna()] if len(m) else m
        for k, v in group.items():
            sel = sel[sel["group"].map(lambda g: (g or {}).get(k) == v)]
        sel = self._enough_users(sel)
        if not len(sel):
            return None
        labels = [
            (g or {}).get(label_key, met) if label_key else met for met, g in zip(sel["metric"], sel["group"])
        ]
        fig, ax = plt.subplots(figsize=(8, 0.4 * len(sel) + 1.2))
        y = np.arange(len(sel))[::-1]
        est, lo, hi = (sel[c].astype(float).to_numpy() for c in ("estimate", "ci_low", "ci_high"))
        # an estimate can sit outside its interval (a clipped or Fieller interval): draw the interval as is
        ax.hlines(y, lo, hi, color="C0")
        ax.plot(est, y, "o", color="C0", label="estimate, 95% CI")
        if sel["truth"].notna().any():
            ax.scatter(sel["truth"], y, marker="x", color="crimson", zorder=3, label="truth (simulated world)")
        ax.set_yticks(y, labels)
        ax.axvline(0, color="grey", lw=0.8)
        ax.set_title(title)
        ax.legend(frameon=False, loc="best")
        fig.tight_layout()
        return fig

    def fig_leak_rates(self):
        """Forest plot of the headline leak rate per sensitive category (all regions)."""
        metric = self.headline_leak_metric()
        return self.fig_estimates(LEAKAGE, [metric], label_key="category", region_group="all",
                                  title=f"{METRIC_LABELS[metric]} by sensitive category")

    def fig_topics(self, top: int = 15):
        """Interactive bar chart of the largest topics (plotly, inlined)."""
        p = self.rd.topic_info
        if not p.exists():
            return None
        import plotly.express as px

        t = self._named_topics(pd.read_parquet(p))[0].head(top)
        fig = px.bar(t.iloc[::-1], x="share", y="name", orientation="h", labels={"share": "share of conversations", "name": ""}, title="Largest topics")
        fig.update_layout(height=max(300, 26 * len(t) + 120), margin=dict(l=10, r=10, t=40, b=10), xaxis_tickformat=".1%")
        return fig


def _not_run(key: str, question: str, stage_name: str, stage: str, source: str) -> Answer:
    return Answer(key, question, f"Not assessed in this run: the {stage_name} stage ({stage}) did not run.", False, source)


def _are(n: int) -> str:
    return "is" if n == 1 else "are"


def _count(n: int) -> str:
    return {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven"}.get(n, str(n))


def _join(parts: list[str]) -> str:
    if not parts:
        return "none above the small-cell threshold"
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _about(n: float) -> str:
    """A planned count as precisely as a plan deserves: exact below 10,000, else two significant digits."""
    n = int(round(n))
    if n < 10_000:
        return f"{n:,}"
    r = int(float(f"{n:.2g}"))
    return f"{r / 1e6:g} million" if r >= 1_000_000 else f"{r:,}"


def _signed_pct(x) -> str:
    return "n/a" if x is None or pd.isna(x) else f"{100 * x:+.1f}%"


_PLOTLY_LOADED = False


def show(fig, missing: str = "Not available in this run (its stage did not run).") -> None:
    """Show a figure or table in a notebook: matplotlib as an embedded PNG, plotly inlined; the
    `missing` note when there is nothing (None or an empty table)."""
    from IPython.display import Markdown, display

    if fig is None or (isinstance(fig, pd.DataFrame) and fig.empty):
        display(Markdown(f"*{missing}*"))
    elif hasattr(fig, "to_plotly_json"):
        show_plotly(fig)
    elif isinstance(fig, pd.DataFrame):
        display(fig)
    else:
        display(fig)
        plt.close(fig)


def show_plotly(fig):
    """Display a plotly figure as HTML with plotly.js inlined once per notebook, so the exported
    report is self-contained (no CDN) and interactive."""
    from IPython.display import HTML, display

    global _PLOTLY_LOADED
    if fig is None:
        return
    display(HTML(fig.to_html(full_html=False, include_plotlyjs=not _PLOTLY_LOADED, config={"displaylogo": False})))
    _PLOTLY_LOADED = True
