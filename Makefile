# Developer entry points. Both need root: the lab runs a real Slurm cluster on this machine.
#
#   make test    bring the lab up, run every test tier, always bring the lab down again
#   make demo    serve a tiny model across 2 lab nodes and ask it something (scripts/demo)
#
# PYTEST_ARGS passes options to pytest, e.g. make test PYTEST_ARGS='-k ray -x'.
# LAB_NODES sets the lab's node count (default 4: two replicas of two nodes).

LAB := scripts/slurm-lab
LAB_NODES ?= 4
PYTEST_ARGS ?=

.PHONY: test demo lab-up lab-down lab-status

# The exit status is pytest's (5: nothing was collected, also a failure here). A lab that does
# not come up, or does not go down cleanly, fails the target too.
test:
	@trap '$(LAB) down; exit 130' INT TERM; \
	rc=0; \
	if $(LAB) up $(LAB_NODES); then \
		venv=$$($(LAB) env | sed -n 's/^LAB_VENV=//p'); \
		SLURM_LAB_REQUIRED=1 "$$venv/bin/python" -m pytest $(PYTEST_ARGS) || rc=$$?; \
		[ $$rc -ne 5 ] || echo "make test: pytest collected no tests" >&2; \
	else \
		rc=$$?; echo "make test: the lab did not come up (logs: scripts/slurm-lab env -> LAB_HOME/log)" >&2; \
	fi; \
	$(LAB) down || { echo "make test: the lab did not go down cleanly" >&2; [ $$rc -ne 0 ] || rc=1; }; \
	exit $$rc

demo:
	scripts/demo

lab-up:
	$(LAB) up $(LAB_NODES)

lab-down:
	$(LAB) down

lab-status:
	$(LAB) status
