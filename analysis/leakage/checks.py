"""Checks of the black-box exposure design (issue 14): pre-policy placebo windows and negative-control topics.

The exposure test asks whether a user's share of ads in c's nodes rises after a conversation about c.
A rise can have causes other than chat -> ad flow; two checks look for them where the answer is
known to be "no flow":

- **Pre-policy placebo** (`ExposureTest.fit(..., placebo=True)`): the same test with the treated
  users' windows entirely before the policy date, when the platform did not use chats. A rise there
  is interest that moves with a chat but does not come from it (the platform sees the same interest
  through other signals: a diagnosis, a move, an election) or a flaw of the design.
- **Negative controls** (`negative_control_pairs`): conversations about c against ads in a node far
  from c (another tier-1 of the taxonomy, a node no conversation of the corpus maps to), which chat
  targeting cannot move by construction. A rise there points at a design flaw that is not
  topic-specific (e.g. treated users' ad mix drifting unlike the controls').

Each check is one Holm family over its tests; it fails when any test is significant at alpha.
What they cannot reveal: interest from outside the chat that *starts with the policy date* is
invisible to the placebo, and a topic-specific one to the negative controls.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.leakage.data import related_nodes
from analysis.util.stats import p_adjust
from analysis.util.taxonomy import load_taxonomy

CHECKS = {"placebo": "pre-policy placebo", "negative_control": "negative controls"}


def negative_control_pairs(category_nodes: dict[str, list[str]], node_counts: pd.Series, conversation_nodes=(),
                           taxonomy: pd.DataFrame | None = None) -> dict[str, tuple[str, str]]:
    """For each category: the ad node with the most impressions that chat targeting cannot move.

    A candidate must (a) lie in a tier-1 that none of the category's nodes lie in, (b) not be on the
    branch (itself, above or below) of any category's nodes, and (c) not be on the branch of a node any
    conversation maps to (`conversation_nodes`: every IAB id stage 02 gave a conversation). Returns
    {"<category> -> <node>": (category, node)}; a category without a candidate is left out."""
    tax = load_taxonomy() if taxonomy is None else taxonomy
    tier1 = tax.set_index("id")["tier1_id"].to_dict()
    blocked = related_nodes({n for nodes in category_nodes.values() for n in nodes} | set(map(str, conversation_nodes)), tax)
    counts = node_counts.copy()
    counts.index = counts.index.astype(str)
    cand = [n for n in counts.sort_values(ascending=False, kind="stable").index if n in tier1 and n not in blocked]
    out = {}
    for c, nodes in category_nodes.items():
        t1 = {tier1.get(str(n)) for n in nodes}
        pick = next((n for n in cand if tier1[n] not in t1), None)
        if pick is not None:
            out[f"{c} -> {pick}"] = (c, pick)
    return out


def design_checks(table: pd.DataFrame, alpha: float = 0.05, min_p: float | None = None) -> pd.DataFrame:
    """One row per check: its tests (one Holm family over every tested row of the check: placebo rows of
    every kind and design, or the negative-control rows of the policy window), the smallest Holm
    p-value, whether it failed, and which tests were significant. `min_p` (1 / (B + 1) for B
    permutations): when Holm cannot bring even that below alpha the check cannot fail (`can_fail`)."""
    rows = []
    win = table["window"] if "window" in table else pd.Series("policy", index=table.index)
    sel = {"placebo": (win == "placebo") & (table["kind"] != "negative_control"),
           "negative_control": (win == "policy") & (table["kind"] == "negative_control")}
    for check, m in sel.items():
        t = table[m & table["p_permutation"].notna()]
        row = {"check": check, "name": CHECKS[check], "tests": len(t), "min_p_holm": np.nan, "failed": False, "significant": "",
               "can_fail": not (min_p is not None and len(t) and min_p * len(t) >= alpha)}
        if len(t):
            ph = p_adjust(t["p_permutation"].astype(float), "holm", alpha)
            sig = ph < alpha
            row.update(min_p_holm=float(ph.min()), failed=bool(sig.any()),
                       significant="; ".join(f"{c} ({d}, {g})" for c, d, g in
                                             zip(t["category"][sig], t["design"][sig], t["region_group"][sig])))
        rows.append(row)
    return pd.DataFrame(rows)


def design_caveat(checks: pd.DataFrame | None) -> str:
    """What the checks say about the black-box test's detections (the stage's caveat)."""
    if checks is None or not len(checks) or checks["tests"].sum() == 0:
        return ("no placebo or negative-control test could be run: the design was not checked, and a rise in exposure "
                "after a conversation cannot be told apart from interest that comes from outside the chat")
    c = checks.set_index("check")
    parts = []
    if "placebo" in c.index and c.loc["placebo", "failed"]:
        parts.append("FAILED the pre-policy placebo: ad exposure rose after conversations before the policy date too, when no "
                     f"chat was used ({c.loc['placebo', 'significant']}). The rise after it cannot be told apart from interest "
                     "that moves with a chat but comes from outside it (seen by the platform through other signals): matched-"
                     "design detections and exposure-based violation flags are not evidence of leakage. The included-vs-excluded "
                     "(did) design removes such interest only if it acts alike in both region groups")
    if "negative_control" in c.index and c.loc["negative_control", "failed"]:
        parts.append("FAILED the negative controls: exposure to ads far from the topic rose after conversations "
                     f"({c.loc['negative_control', 'significant']}), a flaw of the design that is not topic-specific")
    if parts:
        return "; ".join(parts)
    weak = [CHECKS[k] for k in CHECKS if k in c.index and c.loc[k, "tests"] and not c.loc[k, "can_fail"]]
    if weak:
        return (f"the {' and '.join(weak)} cannot fail at this number of permutations (the smallest p-value times the "
                "number of tests is at least alpha): the design was not checked, and a rise in exposure after a conversation "
                "cannot be told apart from interest that comes from outside the chat")
    ran = [f"{int(c.loc[k, 'tests'])} {CHECKS[k]} tests" for k in CHECKS if k in c.index and c.loc[k, "tests"]]
    return (f"placebo and negative-control checks null ({', '.join(ran)}, Holm within each). Still, interest from outside the "
            "chat that starts with the policy date itself would pass them: the design cannot tell it from chat flow")
