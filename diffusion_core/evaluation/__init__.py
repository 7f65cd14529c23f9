"""Evaluation of a trained cascade: sample grids, held-out captions and their faithfulness.

FID/KID, the NLL bound and the registry's gate metrics arrive with the evaluate-and-register work
(``docs/`` says what exists).
"""
