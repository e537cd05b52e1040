"""Write the corpus of broken and unusual inputs (tests/data/inputs/<case>/): `python tests/data/inputs/make_corpus.py`.

Each case is a small audit input folder (or file) derived from one clean base: 8 users, 16
conversations, 48 messages, 48 impressions, filter decisions and labels. The expected outcome of
every case (an error naming file/row/column/reason, or counted quarantines) is in
tests/unit/test_input_corpus.py. Seeded and deterministic: rerunning rewrites the same bytes
(Parquet cases aside, whose bytes depend on the pyarrow version).
"""

from __future__ import annotations

import csv
import io
import json
import shutil
from pathlib import Path

HERE = Path(__file__).resolve().parent

USERS = [("u1", "US"), ("u2", "US"), ("u3", "BR"), ("u4", "IN"), ("u5", "DE"), ("u6", "FR"), ("u7", "GB"), ("u8", "CA")]
TOPICS = [
    ("best hiking boots for a beginner", "Look for waterproof boots with ankle support."),
    ("how do I bake sourdough bread", "Start with an active starter and a long proof."),
    ("cheap flights to lisbon in march", "Midweek flights are usually cheapest."),
    ("my doctor says my blood pressure is high, what should I eat", "Less salt, more vegetables; ask your doctor."),
    ("which laptop is good for programming", "Get 16 GB of RAM and a good keyboard."),
    ("i want to start going to church again, any advice", "Visit a few communities and see what fits."),
    ("how to train a puppy to sit", "Short sessions with treats work best."),
    ("explain index funds like I'm five", "An index fund buys a little of everything."),
]
AD_CATEGORIES = ["653", "210", "596", "473", "422", "391", "483", "1"]  # IAB 3.0 ids (tier 1)


def base_tables() -> dict[str, list[dict]]:
    msgs, convs, fd, labels = [], [], [], []
    for c in range(16):
        cid, uid = f"c{c + 1:02d}", USERS[c % 8][0]
        q, a = TOPICS[c % 8]
        day = 1 + c
        month = "2025-11" if c < 8 else "2026-01"
        convs.append(cid)
        for t, (role, text) in enumerate([("user", q), ("assistant", a), ("user", "thanks, tell me more")]):
            msgs.append({"conversation_id": cid, "user_id": uid, "turn_index": t, "role": role, "text": text,
                         "sent_at": f"{month}-{day:02d}T10:00:{t * 5:02d}Z", "modality": "voice" if c % 5 == 0 else "text"})
        fd.append({"conversation_id": cid, "blocked": "true" if c % 8 in (3, 5) else "false", "score": f"{0.9 if c % 8 in (3, 5) else 0.1:.2f}"})
        if c < 8:
            art9 = {3: "health", 5: "religion"}.get(c % 8, "")
            tier1 = {0: "483", 1: "210", 2: "653", 3: "286", 4: "596", 5: "453", 6: "422", 7: "391"}[c % 8]
            labels.append({"conversation_id": cid, "art9": art9, "iab_tier1": tier1})
    imps = []
    for i in range(48):
        uid = USERS[i % 8][0]
        month = "2025-11" if i < 24 else "2026-01"
        imps.append({"impression_id": f"i{i + 1:03d}", "user_id": uid, "shown_at": f"{month}-{1 + i % 28:02d}T12:00:00Z",
                     "ad_category": AD_CATEGORIES[i % 8], "clicked": "true" if i % 7 == 0 else "false",
                     "placement": "feed", "targeting_sources": "ai_chat;likes" if (i >= 24 and i % 3 == 0) else "likes",
                     "arm": "treatment"})
    users = [{"user_id": u, "region": r, "age_band": "25-34"} for u, r in USERS]
    return {"users": users, "messages": msgs, "impressions": imps, "filter_decisions": fd, "labels": labels}


def to_csv(rows: list[dict], sep: str = ",") -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]), delimiter=sep, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def write_case(name: str, tables: dict[str, list[dict]], *, skip: tuple = (), raw: dict[str, str | bytes] | None = None) -> Path:
    d = HERE / name
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    for t, rows in tables.items():
        if t not in skip:
            (d / f"{t}.csv").write_text(to_csv(rows), encoding="utf-8")
    for fname, content in (raw or {}).items():
        p = d / fname
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content, encoding="utf-8")
    return d


def sharegpt_records() -> list[dict]:
    recs = []
    for c in range(12):
        q, a = TOPICS[c % 8]
        recs.append({"id": f"sg{c // 2}_{c % 2}", "conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]})
    return recs


def chatgpt_conversation(k: int, q: str, a: str) -> dict:
    """One conversation of an OpenAI ChatGPT export: a message tree, active branch ending at current_node."""
    t0 = 1764000000 + k * 3600
    def node(nid, parent, children, role, text, t):
        msg = None if role is None else {"author": {"role": role}, "create_time": t, "content": {"content_type": "text", "parts": [text]}}
        return {"id": nid, "parent": parent, "children": children, "message": msg}
    mapping = {
        "root": node("root", None, ["s"], None, "", None),
        "s": node("s", "root", ["u"], "system", "", t0),
        "u": node("u", "s", ["a1", "a2"], "user", q, t0 + 1),
        "a1": node("a1", "u", [], "assistant", "an abandoned draft answer", t0 + 2),
        "a2": node("a2", "u", [], "assistant", a, t0 + 3),
    }
    return {"title": q[:20], "create_time": t0, "conversation_id": f"cg{k:03d}", "mapping": mapping, "current_node": "a2"}


def main() -> None:
    b = base_tables()
    write_case("clean", b)
    # unusual inputs that must load as they are
    bom = {t: "\ufeff" + to_csv(r).replace("\n", "\r\n") for t, r in b.items()}
    write_case("bom_crlf", {}, raw={f"{t}.csv": s for t, s in bom.items()})
    m = [dict(r) for r in b["messages"]]
    for i, r in enumerate(m):
        r["sent_at"] = r["sent_at"].replace("Z", "") if i % 2 else r["sent_at"].replace("Z", "+02:00")
        r["role"] = r["role"].upper() if i % 3 == 0 else r["role"].capitalize()
    m[4]["text"] = "nul\x00byte inside " + "x" * 200_000
    write_case("naive_offsets_case_nul_long", {**b, "messages": m})
    # duplicates and orphans: counted quarantines
    m = b["messages"] + [dict(b["messages"][0], text="a duplicate turn")]
    imps = b["impressions"] + [dict(b["impressions"][0], impression_id="i999", user_id="ghost")]
    write_case("duplicates_orphans", {**b, "messages": m, "impressions": imps})
    # unknown ad_category ids: quarantined against IAB 3.0
    imps = [dict(r, ad_category="999999") if i in (2, 9) else r for i, r in enumerate(b["impressions"])]
    write_case("unknown_ad_category", {**b, "impressions": imps})
    # JSON Lines with garbage lines: counted as read and quarantined
    def jsonl(rows, garbage_every):
        out = []
        for i, r in enumerate(rows):
            out.append(json.dumps(r))
            if garbage_every and i % garbage_every == 0:
                out.append("{not json")
        return "\n".join(out) + "\n"
    write_case("jsonl_some_garbage", b, skip=("impressions",), raw={"impressions.jsonl": jsonl(b["impressions"], 12)})
    write_case("jsonl_half_garbage", b, skip=("impressions",), raw={"impressions.jsonl": jsonl(b["impressions"], 1)})
    # a ';'-delimited messages CSV: named
    write_case("semicolon_messages", b, skip=("messages",), raw={"messages.csv": to_csv(b["messages"], sep=";")})
    # epoch-second timestamps: named
    m = [dict(r, sent_at=str(1764590400 + i * 5)) for i, r in enumerate(b["messages"])]
    write_case("epoch_timestamps", {**b, "messages": m})
    # labels as people write them: tier-1 names in any case, ';'-separated art9, empty art9 = none
    names = {"483": "Sports", "210": "food & drink", "653": "TRAVEL", "286": "Medical Health", "596": "596",
             "453": "Religion & Spirituality", "422": "pets", "391": "Personal Finance"}
    lab = [dict(r, iab_tier1=names[r["iab_tier1"]]) for r in b["labels"]]
    lab[3]["art9"] = "health;religion"
    lab.append({"conversation_id": "c09", "art9": "", "iab_tier1": "Nonsense Category"})
    lab.append({"conversation_id": "c10", "art9": "astrology", "iab_tier1": "none"})
    write_case("labels_names", {**b, "labels": lab})
    # optional tables and columns absent
    write_case("no_filter_no_labels", b, skip=("filter_decisions", "labels"))
    imps = [{k: v for k, v in r.items() if k not in ("arm", "targeting_sources", "placement")} for r in b["impressions"]]
    m = [{k: v for k, v in r.items() if k != "modality"} for r in b["messages"]]
    write_case("no_optional_columns", {**b, "impressions": imps, "messages": m})
    imps = [dict(r, arm="") for r in b["impressions"]]
    write_case("arm_all_empty", {**b, "impressions": imps})
    # a Hive-partitioned Parquet folder (impressions/month=YYYY-MM/part-0.parquet)
    import pyarrow as pa
    import pyarrow.csv as pacsv
    import pyarrow.parquet  # noqa: F401 (pa.parquet)
    d = write_case("hive_partitioned", b, skip=("impressions",))
    for month in ("2025-11", "2026-01"):
        part = [r for r in b["impressions"] if r["shown_at"].startswith(month)]
        t = pacsv.read_csv(io.BytesIO(to_csv(part).encode()), convert_options=pacsv.ConvertOptions(column_types={"ad_category": pa.string()}))
        (d / "impressions" / f"month={month}").mkdir(parents=True)
        pa.parquet.write_table(t, d / "impressions" / f"month={month}" / "part-0.parquet")
    # not UTF-8, empty file, missing column: errors
    write_case("latin1_messages", b, skip=("messages",), raw={"messages.csv": to_csv(b["messages"]).replace("sourdough", "sourdough café").encode("latin-1")})
    write_case("empty_impressions", b, skip=("impressions",), raw={"impressions.csv": ""})
    write_case("missing_column", {**b, "users": [{"user_id": r["user_id"]} for r in b["users"]]})
    # chat exports
    recs = sharegpt_records()
    recs[1]["conversations"].insert(0, {"from": "system", "value": "You are a helpful assistant."})
    recs[2]["conversations"].append({"from": "human", "value": "   "})
    recs[3]["conversations"].append({"from": "gpt", "value": ""})
    write_case("sharegpt_system_empty", {}, raw={"sharegpt.json": json.dumps(recs, indent=1)})
    text = json.dumps(sharegpt_records(), indent=1)
    write_case("sharegpt_truncated", {}, raw={"sharegpt.json": text[: text.rfind('"from": "gpt"') + 10]})
    convs = [chatgpt_conversation(k, *TOPICS[k % 8]) for k in range(6)]
    write_case("chatgpt_export", {}, raw={"export/conversations.json": json.dumps(convs)})
    write_case("chatgpt_export_numbered", {}, raw={"conversations-000.json": json.dumps(convs[:3]), "conversations-001.json": json.dumps(convs[3:])})
    # data donations: participants.csv + one export per participant (folder, .zip, parts); one broken
    # export, one export without a participants row, one participant without an export, a consent date
    import zipfile
    d = write_case("donations", {}, raw={
        "participants.csv": "participant_id,region,consent_date\nP1,US,\nP2,DE,2025-11-25T02:30:00Z\nP3,BR,\nP4,FR,\nP5,IN,\n",
        "P1/conversations.json": json.dumps(convs[:2]),
        "P3/conversations-000.json": json.dumps(convs[2:3]), "P3/conversations-001.json": json.dumps(convs[3:4]),
        "P4/conversations.json": '[{"mapping": {"a": ',
        "P9/conversations.json": json.dumps(convs[5:]),
    })
    with zipfile.ZipFile(d / "P2.zip", "w") as z:  # fixed timestamps: the same bytes on every run
        z.writestr(zipfile.ZipInfo("export/conversations.json", date_time=(2025, 12, 1, 0, 0, 0)), json.dumps([chatgpt_conversation(10 + k, *TOPICS[k]) for k in range(3)]))
    print("corpus written to", HERE)


if __name__ == "__main__":
    main()
