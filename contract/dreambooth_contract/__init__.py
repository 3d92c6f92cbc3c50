"""What the operator and the trainer agree on, written once: both import it, it imports neither.

Pydantic and PyYAML only (no torch, no kopf, no Kubernetes client, no boto3), so the operator's
slim image and the trainer's can both carry it:

- api: the DreamBoothJob models (the CRD schema is generated from them);
- validation: a job file or object -> DreamBoothJob, with field-naming messages;
- names: the names and labels of everything a job owns;
- env: what a trainer process gets from the operator (variables, ports, files, exit codes);
- trainer_config: the trainer's config, built from a job by the operator or a local run;
- priors_key: the content-addressed key of a class-image set;
- layout: where a job's files lie under storage.outputUri, and how URIs are joined.
"""
