"""mindhier: fMRI-to-image reconstruction by hierarchy-to-hierarchy autoregression.

The library (this package minus ``mindhier.train``) holds models, data readers, sampling and
metrics; ``mindhier.train`` holds training loops and is never imported by the library.

From Python (notebooks), three names cover the whole path:

    pipe = mindhier.Pipeline.from_pretrained("checkpoints/demo")
    test = mindhier.load_test_set("worlds/demo", subject=1)
    mindhier.evaluate_images(pipe(test.voxels, image_ids=test.image_index).images, test.stimuli)

They are imported on first use, so ``import mindhier`` stays instant (no torch until needed).
"""

import importlib

__version__ = "0.1.0"

# public name → the module that defines it (PEP 562 lazy attributes)
_LAZY = {
    "Pipeline": "mindhier.pipeline",
    "PipelineOutput": "mindhier.pipeline",
    "load_test_set": "mindhier.data.datasets",
    "TestData": "mindhier.data.datasets",
    "evaluate_images": "mindhier.evaluate",
    "MindhierError": "mindhier.errors",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'mindhier' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value   # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
