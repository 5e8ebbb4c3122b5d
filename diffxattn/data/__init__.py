"""Training data: procedural shapes scenes with exact masks, and image folders with metadata.jsonl."""

from .captions import WORDS, build_caption, parse_caption, parse_caption_words
from .imagefolder import ImageFolderDataset
from .shapes import (
    COLORS,
    POSITION_ANCHORS,
    POSITIONS,
    RELATIONS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    ShapesConfig,
    ShapesDataset,
    collate_shapes,
    render,
    sample_scene,
    scene_from_caption,
    scene_from_spec,
)

__all__ = [
    "COLORS", "SHAPES", "SIZES", "POSITIONS", "RELATIONS", "POSITION_ANCHORS", "WORDS",
    "ShapesConfig", "SceneObject", "Scene", "sample_scene", "render", "scene_from_spec",
    "scene_from_caption", "ShapesDataset", "collate_shapes", "parse_caption", "parse_caption_words",
    "build_caption", "ImageFolderDataset",
]
