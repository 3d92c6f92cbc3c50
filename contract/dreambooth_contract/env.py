"""What a trainer process gets from the operator, and what it leaves for it: environment
variables, ports, where its config is mounted, exit codes and the termination message.

The operator's builders put these into the pods; the trainer reads them back. Local runs and
tests set some of them by hand.
"""

from __future__ import annotations

# The DreamBoothJob a trainer pod works for; set means "report the status to Kubernetes".
JOB_NAME_ENV = "DBJ_NAME"
JOB_NAMESPACE_ENV = "DBJ_NAMESPACE"
# The port rank 0 serves /metrics on; 0, off or false turns the exporter off.
METRICS_PORT_ENV = "DREAMBOOTH_METRICS_PORT"
TRAINER_METRICS_PORT = 9400
RENDEZVOUS_PORT = 29500

# The trainer config: one file of the job's ConfigMap, mounted read-only in every pod.
CONFIG_FILE = "trainer.json"
CONFIG_MOUNT = "/etc/dreambooth"

# Downloaded and built models, and local copies of s3:// files (trainer and server).
CACHE_DIR_ENV = "DREAMBOOTH_CACHE"
DEFAULT_CACHE_DIR = "~/.cache/dreambooth"

# Bad input (a config error) cannot be helped by a restart: the trainer exits 2 and, because
# torchrun reports its own exit code (1) for a failed worker, also leaves a termination message
# starting with BAD_INPUT_PREFIX. Either tells the operator to fail the job.
EXIT_BAD_INPUT = 2
BAD_INPUT_PREFIX = "bad input: "
TERMINATION_LOG = "/dev/termination-log"
TERMINATION_LOG_ENV = "DREAMBOOTH_TERMINATION_LOG"
