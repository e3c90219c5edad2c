"""The synthetic BraTS-like cohort (``python -m prep synth``), apart from ingestion: the generator on nilearn's
MNI152 anatomy (``generator``), the tumour (``tumour``), smooth fields (``fields``), what misleads real models
(``confounders``), the BraTS and MSD file layouts it writes (``layouts``) and its preview pictures (``preview``)."""

from .generator import FOV_MM, FULL_SHAPE, SynthConfig, brats_affine, make_case, synth_cohort, write_case

__all__ = ["FOV_MM", "FULL_SHAPE", "SynthConfig", "brats_affine", "make_case", "synth_cohort", "write_case"]
