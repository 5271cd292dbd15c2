# Two commands do all the set-up: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_DATA ?= data_synthetic
DEMO_RUN  ?= runs/demo

.PHONY: venv test test-fast lint demo data-demo validate gpu-check gpu-report clean

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check .

data-demo: $(STAMP)
	$(PY) tools/make_synthetic.py --out $(DEMO_DATA)/raw --mode raw --size demo --seed 0 --overwrite
	$(PY) tools/prepare_isprs.py --dataset potsdam --bands rgb --raw $(DEMO_DATA)/raw/potsdam --out $(DEMO_DATA)/potsdam_rgb --overwrite
	$(PY) tools/prepare_isprs.py --dataset potsdam --bands irrg --raw $(DEMO_DATA)/raw/potsdam --out $(DEMO_DATA)/potsdam_irrg --overwrite
	$(PY) tools/prepare_isprs.py --dataset vaihingen --bands irrg --raw $(DEMO_DATA)/raw/vaihingen --out $(DEMO_DATA)/vaihingen_irrg --overwrite

demo: data-demo
	$(PY) tools/run_pipeline.py --config configs/demo.yaml --work-dir $(DEMO_RUN) --overwrite --warm-start
	@echo "Where these numbers come from: one training seed (1240) of ResNet-18 without ImageNet weights on the"
	@echo "demo-size synthetic pair (data seed 0; 54 source-train, 24 target-train, 16 target-val patches at 256 px)."
	@echo "16 patches move a stage's mIoU by several points from one evaluation to the next, so read the table as"
	@echo "the pipeline at work; the methods are compared over seeds in docs/validity/README.md (make validate)."

# The validity study on the data seeds nothing was tuned on (about 2.4 hours per data seed on 2 cores).
VALIDATE_DATA_SEEDS ?= 1 2
validate: $(STAMP)
	for d in $(VALIDATE_DATA_SEEDS); do \
		$(PY) tools/validity.py --data-seed $$d --seeds 0 1 2 --out runs/validity_d$$d || exit 2; \
	done

gpu-check: $(STAMP)
	$(PY) tools/gpu_check.py

# The whole GPU report with the machine's own python3 (no venv, no install, no network; its packages:
# utils/gpu_machine.py): at most 560 s, rewritten after every part.
gpu-report:
	$(PYTHON) tools/gpu_report.py --out gpu-report

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache $(DEMO_DATA) runs/demo
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
