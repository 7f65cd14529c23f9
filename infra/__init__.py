"""Deployment of cascade-diffusion: local services (``infra.local``), Kubernetes manifests
(``infra/k8s``) and the container image (``infra/docker``). See docs/deploy.md."""
