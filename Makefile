# Two commands do everything on a fresh machine (Python 3.11, gcc, cmake):
#   make demo   - build .venv if needed, make synthetic data, train MeLU on 2 Horovod workers, log to MLflow
#   make test   - build .venv if needed, run the test suite (the fast tier; make test-slow: the rest)
VENV := .venv
BIN := $(VENV)/bin
DATA ?= data/synth
NP ?= 2
MODEL ?= melu
export PYTHONUNBUFFERED := 1

.PHONY: venv demo daily-demo test test-slow test-all bench clean

venv:
	@bash tools/bootstrap.sh

demo: venv
	@test -f $(DATA)/schema.json || $(BIN)/gmeta datagen --out $(DATA) --seed 0
	PATH=$(abspath $(BIN)):$$PATH $(BIN)/horovodrun -np $(NP) -H localhost:$(NP) --gloo \
	    $(BIN)/gmeta train --model $(MODEL) --data $(DATA) --tracking-uri sqlite:///mlflow.db

daily-demo: venv
	BIN=$(BIN) bash tools/daily_demo.sh daily-demo

test: venv
	-@bash tools/cluster/install_sshd.sh
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow" tests

test-slow: venv
	-@bash tools/cluster/install_sshd.sh
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m slow tests

test-all: venv
	-@bash tools/cluster/install_sshd.sh
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

bench: venv
	$(BIN)/gmeta bench io --json
	$(BIN)/gmeta bench io --input-wait --json
	$(BIN)/gmeta bench step --json
	$(BIN)/gmeta bench step --full --json
	$(BIN)/gmeta bench meta --json
	$(BIN)/gmeta bench memory --json
	$(BIN)/gmeta bench projection --json
	$(BIN)/gmeta bench movielens --json
	$(BIN)/gmeta bench breakdown --json
	$(BIN)/gmeta bench hot --json
	$(BIN)/gmeta bench coldstart --json
	$(BIN)/gmeta bench scaling --json

clean:
	rm -rf $(VENV) data mlflow.db mlruns .pytest_cache daily-demo
