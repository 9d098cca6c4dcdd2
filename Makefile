# One place that creates the environment and runs the demo; README and .ci/run call these targets.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: env demo lint test test-fast clean job-reference

# No pip cache: the CUDA wheels torch brings are ~3 GB, and a cached copy would double them on disk.
$(BIN)/pipeline: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install --no-cache-dir -e '.[test]'
	$(BIN)/pip freeze --exclude-editable > $(VENV)/tested-versions.txt
	touch $@

env: $(BIN)/pipeline

# Synthetic labelled scenes: training scenes and held-out nightly scenes (different seeds).
data/train/truth.json: | env
	$(BIN)/pipeline synth data/train --scenes 12 --size 1024 --seed 1
data/scenes/truth.json: | env
	$(BIN)/pipeline synth data/scenes --scenes 2 --size 2048 --seed 2 --nodata-regions
# Plain PNG factory images (no georeferencing) for jobs/inspection.yaml (about a second).
data/inspection/truth.json: | env
	$(BIN)/pipeline synth data/inspection --kind inspection --scenes 4 --size 1024 --seed 3

# A small RetinaNet fine-tuned on the training scenes with Ray Train (CPU, a few minutes).
models/retinanet.pt: data/train/truth.json jobs/train_synth.yaml
	$(BIN)/pipeline train jobs/train_synth.yaml

# The main job, then evaluation, a query and a quicklook. Re-running skips committed scenes.
demo: env data/scenes/truth.json data/inspection/truth.json models/retinanet.pt
	$(BIN)/pipeline run jobs/satellite.yaml
	$(BIN)/pipeline eval out/detections --truth data/scenes/truth.json --job jobs/satellite.yaml -o out/eval
	$(BIN)/pipeline query out/detections "SELECT scene_id, label, count(*) AS n, round(avg(score), 3) AS mean_score FROM detections GROUP BY ALL ORDER BY scene_id, label"
	$(BIN)/pipeline render out/detections data/scenes/synth_000.tif -o out/quicklook_synth_000.png
	@echo
	@echo "model:       models/retinanet.pt (trained on data/train; metrics in models/train_synth/)"
	@echo "detections:  out/detections (GeoParquet; query with: $(BIN)/pipeline query out/detections \"SQL\")"
	@echo "run reports: out/detections/_reports/"
	@echo "evaluation:  out/eval/"
	@echo "quicklook:   out/quicklook_synth_000.png"
	@echo "also ready:  $(BIN)/pipeline validate jobs/inspection.yaml (data/inspection: PNGs, pixel coordinates)"

# Lint and type check first (seconds), then the suite.
lint: env
	$(BIN)/ruff check pipeline retinanet tests bench
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

# The fast tier, for the edit-test loop: lint, then every test that needs no Ray cluster and is
# not marked slow. tests/conftest.py marks `ray` each test that requests the ray_session fixture
# (tests that start Ray in a child process carry the mark themselves); `slow` marks the heavy
# ones (OpenVINO conversions, full-size ResNet-50 models, training, fault injection). No Ray
# starts. Two pytest processes (pytest-xdist), one torch thread each: on 2 cores that beats one
# process whose torch threads contend with each other. `make test` (CI) still runs everything.
test-fast: lint
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n 2 -m "not ray and not slow"

# docs/job-reference.md is generated from the job model; a test fails when it is stale.
job-reference: env
	$(BIN)/pipeline schema --markdown > docs/job-reference.md

clean:
	rm -rf $(VENV) data out models
