"""Shared vocabulary of LoRA Studio: registries, configs, DTOs, file I/O and model loading.

Nothing here imports another package of the project.
"""
