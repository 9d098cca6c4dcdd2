"""The README's "Reading the table with your own tools" block runs as written and agrees
with `pipeline query`."""
from __future__ import annotations

import re
from pathlib import Path

from readers import pipeline_rows
from test_table import rows, run_info

from pipeline.table.commit import commit_scene

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_reader_snippets_run_and_agree(tmp_path):
    run = run_info()
    for scene, n, day in (("a", 10, "2024-05-01"), ("b", 7, "2024-05-02"), ("a", 4, "2024-05-02")):
        commit_scene(tmp_path, run, scene, "k", rows(run, scene, n, seed=n, date=day))
    section = README.read_text().split("### Reading the table with your own tools", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    assert code.startswith('TABLE = "out/detections"\n')
    scope: dict = {}
    exec(code.replace('TABLE = "out/detections"', f"TABLE = {str(tmp_path)!r}", 1), scope)
    expected = pipeline_rows(tmp_path)
    assert len(expected) == 11  # scene a's first version is superseded
    assert sum(n for _, n in scope["counts"]) == len(scope["frame"]) == scope["table"].num_rows \
        == scope["polars_rows"] == len(expected)
    assert scope["frame"].crs.to_epsg() == 32633 and scope["frame"].geometry.is_valid.all()
