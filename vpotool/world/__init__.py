"""The tiny world: a prompt grammar of moving shapes and a renderer of their ground-truth clips."""

from vpotool.world.grammar import WorldPrompt, parse_prompt, world_prompts
from vpotool.world.render import render_batch, render_clip

__all__ = ["WorldPrompt", "parse_prompt", "render_batch", "render_clip", "world_prompts"]
