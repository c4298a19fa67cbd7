"""`mpm demo`: a miniature synthetic world (shapes, colours, captions in several languages) for CPU-sized runs."""

from mpm.demo.world import Scene, SceneObject, World, load_world, segmentation_words

__all__ = ["Scene", "SceneObject", "World", "load_world", "segmentation_words"]
