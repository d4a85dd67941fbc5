"""Repository-root wrapper of ``cocoinr-generate-scene`` (same CLI): ``python scripts/generate_scene.py --help``."""

from cocoinr_nerfstudio.scripts.generate_scene import entrypoint

if __name__ == "__main__":
    entrypoint()
