"""The services of one machine (MLflow, Prefect server + worker, a Ray head) on loopback:
``python infra/local/services.py up|down|status|env``, or :class:`infra.local.services.Services`."""
