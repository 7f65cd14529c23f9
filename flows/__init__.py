"""Thin Prefect flows over ``diffusion_core``: orchestration only, no model or data code."""
