"""The one input expander's pure rules: pattern roots, scene ids, collisions, label matching."""
from __future__ import annotations

import pytest

from pipeline.errors import ConfigError, InputError
from pipeline.io.inputs import (
    InputSet,
    SceneInput,
    expand_patterns,
    id_collisions,
    label_image_id,
    match_label_images,
    pattern_root,
    require_scenes,
    scene_id_for,
)


@pytest.mark.parametrize("pattern, root", [
    ("data/scenes/*.tif", "data/scenes"), ("data/**/x/*.tif", "data"), ("a/b.tif", "a"), ("x.tif", ""),
    ("/*.tif", "/"), ("s3://b/k/*/v.tif", "s3://b/k"), ("s3://b/t.tif", "s3://b"), ("d[12]/*.tif", ""),
])
def test_pattern_root(pattern, root):
    assert pattern_root(pattern) == root


@pytest.mark.parametrize("location, root, expected", [
    ("data/scenes/tile_07.tif", "data/scenes", "tile_07"),
    ("archive/S2A_T32TQM/TCI.tif", "archive", "S2A_T32TQM/TCI"),
    ("s3://b/s2/item_9/visual.tif", "s3://b/s2", "item_9/visual"),
    ("/data/a/scene.tif", None, "scene"),                      # a plain file: its stem
    ("https://h/x/RGB.byte.tif?X-Amz-Signature=1", None, "RGB.byte"),
    ("/x.tif", "/", "x"),
])
def test_scene_ids_are_relative_to_the_pattern_root(location, root, expected):
    assert scene_id_for(location, root) == expected


def test_ids_are_stable_and_collisions_name_both_inputs(tmp_path):
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "scene.tif").write_bytes(b"")
    as_pattern = expand_patterns([str(tmp_path / "*" / "scene.tif")])
    assert [s.scene_id for s in as_pattern.scenes] == ["a/scene", "b/scene"]
    assert id_collisions(as_pattern.scenes) == []
    as_files = expand_patterns([str(tmp_path / "a" / "scene.tif"), str(tmp_path / "b" / "scene.tif")])
    [problem] = id_collisions(as_files.scenes)
    assert str(tmp_path / "a" / "scene.tif") in problem and str(tmp_path / "b" / "scene.tif") in problem
    with pytest.raises(ConfigError, match="job: inputs.paths: scene id 'scene' is given by two inputs"):
        require_scenes(as_files, "inputs.paths")
    # The same file through two patterns is one scene, under the first pattern's id.
    both = expand_patterns([str(tmp_path / "*" / "scene.tif"), str(tmp_path / "a" / "scene.tif")])
    assert [s.scene_id for s in both.scenes] == ["a/scene", "b/scene"] and not both.unmatched


def test_no_scene_at_all_is_refused_naming_the_patterns():
    with pytest.raises(ConfigError, match=r"no scene found: 'x/\*\*/\*.tif' matched nothing"):
        require_scenes(InputSet([], ["x/**/*.tif"]), "inputs.paths")
    require_scenes(InputSet([SceneInput("a.tif", "a", "*.tif")], ["empty/*.tif"]), "inputs.paths")  # a warning only


def test_label_images_match_scene_ids():
    assert label_image_id("./a\\x.tif") == "a/x" and label_image_id("OSBS_029.tif") == "OSBS_029"
    scenes = ["S2A/TCI", "S2B/TCI", "synth_000", "deep/er/low"]
    assert match_label_images(["S2A/TCI", "synth_000", "low", "/data/nested/deep/er/low", "other"], scenes) == {
        "S2A/TCI": "S2A/TCI", "synth_000": "synth_000", "low": "deep/er/low",
        "/data/nested/deep/er/low": "deep/er/low"}
    with pytest.raises(InputError, match="image 'TCI' matches scenes 'S2A/TCI' and 'S2B/TCI'"):
        match_label_images(["TCI"], scenes, "truth.json")
