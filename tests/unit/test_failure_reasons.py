"""A failed stage's one-line reason is its exception: type, message and the project frame it came from."""

from __future__ import annotations

from analysis.pipeline import PROJECT_ROOT, _one_line, project_frame


class FakePapermillError(Exception):
    """What papermill raises: the kernel's exception name, value and ANSI-coloured traceback lines."""

    def __init__(self, ename, evalue, traceback):
        super().__init__(evalue)
        self.ename, self.evalue, self.traceback = ename, evalue, traceback


def test_reason_names_the_exception_and_the_deepest_project_frame():
    tb = [
        "\x1b[0;31mValueError\x1b[0m   Traceback (most recent call last)",
        f"File \x1b[0;32m{PROJECT_ROOT}/analysis/stages/leakage.py:30\x1b[0m, in \x1b[0;36mrun\x1b[0;34m(run_dir)\x1b[0m",
        f"File \x1b[0;32m{PROJECT_ROOT}/analysis/impressions.py:43\x1b[0m, in \x1b[0;36mread_impressions\x1b[0;34m(path)\x1b[0m",
        "File \x1b[0;32m/venv/lib/python3.11/site-packages/pyarrow/table.pxi:5233\x1b[0m, in \x1b[0;36mpyarrow.lib.Table._to_pandas\x1b[0m",
        "\x1b[0;31mValueError\x1b[0m: Categorical categories cannot be null",
    ]
    e = FakePapermillError("ValueError", "Categorical categories cannot be null", tb)
    assert _one_line(e) == "ValueError: Categorical categories cannot be null (at analysis/impressions.py:43 in read_impressions)"


def test_a_data_error_keeps_its_message_and_python_tracebacks_work_too():
    try:
        raise ValueError("messages.csv: row 1, column 'sent_at': looks like a Unix epoch number: '1764590400'")
    except ValueError as e:
        line = _one_line(e)
    assert line.startswith("ValueError: messages.csv: row 1, column 'sent_at': looks like a Unix epoch number: '1764590400'")
    assert project_frame([f'  File "{PROJECT_ROOT}/analysis/ingest/check.py", line 77, in _parse\n    x']) == "analysis/ingest/check.py:77 in _parse"
    assert project_frame(["File /elsewhere/lib.py:1, in f(x)"]) is None
