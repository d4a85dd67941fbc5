"""CoCo-INR for nerfstudio: a VolSDF surface model whose fields attend to a frozen VQGAN codebook.

Kept import-free on purpose: nerfstudio imports our entry points for every ``ns-*`` command.
"""

__version__ = "0.1.0"
