"""The ``videoscore`` reward on a tiny random Idefics2 checkpoint built offline: loading, scoring, gradients, keys."""

from __future__ import annotations

import json

import pytest
import torch

from vpotool.errors import VpoError
from vpotool.rewards.videoscore import (
    DIMENSIONS,
    FAKE_TOKEN,
    IMAGE_TOKEN,
    PROMPT_TEMPLATE,
    VideoScoreModel,
    build_query,
    load_videoscore,
    resize_size,
)

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", FAKE_TOKEN, IMAGE_TOKEN, "<end_of_utterance>"]
WORDS = "a an the red blue green circle square moving left right up down fast slowly on black background".split()
PROMPTS = ["a red circle", "a blue square moving up fast on the black background"]


def tiny_config(**overrides):
    from transformers import Idefics2Config

    kw = dict(
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=56,
            patch_size=14,
        ),
        perceiver_config=dict(
            hidden_size=32, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2, resampler_head_dim=8,
            num_key_value_heads=1,
        ),
        text_config=dict(
            model_type="mistral", vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, pad_token_id=3,
        ),
        image_token_id=SPECIALS.index(IMAGE_TOKEN),
        num_labels=5,
    )  # fmt: skip
    kw.update(overrides)
    return Idefics2Config(**kw)


def save_tokenizer(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS + WORDS + [".", ",", ":", '"', "-"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIALS)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.pad_token = "<pad>"
    fast.save_pretrained(folder)


TEST_CARD = '# Model\n\n```python\nMAX_NUM_FRAMES={frames}\nREGRESSION_QUERY_PROMPT = """{instruction}"""\n```\n'
TEST_INSTRUCTION = 'Score the clip for the text prompt "{text_prompt}".\nFrames:\n'


def save_checkpoint(folder, config=None, seed=0, card_frames: int | None = 16):
    """A tiny random VideoScore folder; with ``card_frames``, a README.md model card whose code sets
    ``MAX_NUM_FRAMES`` and ``REGRESSION_QUERY_PROMPT`` as the published cards do."""
    torch.manual_seed(seed)
    model = VideoScoreModel(config or tiny_config()).eval()
    model.save_pretrained(folder)
    save_tokenizer(folder)
    if card_frames:
        (folder / "README.md").write_text(TEST_CARD.format(frames=card_frames, instruction=TEST_INSTRUCTION))
    processor = {"do_image_splitting": False, "size": {"shortest_edge": 28, "longest_edge": 56}, "resample": 2}
    (folder / "preprocessor_config.json").write_text(json.dumps({**processor, "image_mean": [0.5] * 3}))
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("videoscore")
    save_checkpoint(folder)
    return folder


@pytest.fixture(scope="module")
def reward(checkpoint):
    return load_videoscore(path=str(checkpoint), frames=3)


def videos(seed=0, b=2, t=4, size=32):
    return torch.rand(b, t, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_scores_have_named_dimensions_and_overall_is_their_mean(reward):
    with torch.no_grad():
        out = reward(videos(), PROMPTS)
    assert reward.dimensions == (*DIMENSIONS, "overall") and set(out) == set(reward.dimensions)
    for name in reward.dimensions:
        assert out[name].shape == (2,) and out[name].dtype == torch.float32 and torch.isfinite(out[name]).all()
    mean = torch.stack([out[d] for d in DIMENSIONS]).mean(0)
    torch.testing.assert_close(out["overall"], mean)
    assert reward.differentiable and reward.score_range == (1.0, 4.0) and reward.device == torch.device("cpu")


def test_gradient_reaches_the_pixels(reward):
    frames = videos().requires_grad_()
    reward(frames, PROMPTS)["overall"].sum().backward()
    assert torch.isfinite(frames.grad).all() and frames.grad.abs().sum() > 0
    assert all(p.grad is None for p in reward.model.parameters())


def test_head_outputs_map_to_dimensions_in_published_order(reward):
    head = reward.model.score
    saved = head.weight.clone(), head.bias.clone()
    try:
        head.weight.zero_()
        head.bias.copy_(torch.arange(1.0, 6.0))
        with torch.no_grad():
            out = reward(videos(), PROMPTS)
    finally:
        head.weight.copy_(saved[0])
        head.bias.copy_(saved[1])
    assert [out[d][0].item() for d in DIMENSIONS] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert DIMENSIONS[1] == "temporal_consistency" and DIMENSIONS[3] == "text_to_video_alignment"


def test_batch_scores_match_one_at_a_time_with_different_prompt_lengths(reward):
    frames = videos(seed=1)
    ids, mask = reward.tokens(PROMPTS, 3)
    assert mask[0].sum() < mask[1].sum()  # the first row is padded
    with torch.no_grad():
        batch = reward(frames, PROMPTS)
        single = [reward(frames[i : i + 1], [p]) for i, p in enumerate(PROMPTS)]
    for name in reward.dimensions:
        torch.testing.assert_close(batch[name], torch.cat([s[name] for s in single]), atol=1e-5, rtol=1e-5)


def test_mid_grey_frames_are_scored_not_dropped(reward):
    with torch.no_grad():
        out = reward(torch.full((1, 3, 3, 32, 32), 0.5), PROMPTS[:1])  # normalises to all-zero pixels
    assert torch.isfinite(out["overall"]).all()


def published_keys(config) -> set[str]:
    """The checkpoint's parameter names as Mantis' Idefics2ForSequenceClassification writes them, spelled out."""
    keys = {"score.weight", "score.bias"}
    v = "model.vision_model."
    keys |= {v + k for k in ("embeddings.patch_embedding.weight", "embeddings.patch_embedding.bias")}
    keys |= {v + "embeddings.position_embedding.weight", v + "post_layernorm.weight", v + "post_layernorm.bias"}
    for i in range(config.vision_config.num_hidden_layers):
        for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "layer_norm1",
                     "layer_norm2", "mlp.fc1", "mlp.fc2"):  # fmt: skip
            keys |= {f"{v}encoder.layers.{i}.{part}.weight", f"{v}encoder.layers.{i}.{part}.bias"}
    c = "model.connector."
    keys |= {f"{c}modality_projection.{p}_proj.weight" for p in ("gate", "up", "down")}
    keys |= {c + "perceiver_resampler.latents", c + "perceiver_resampler.norm.weight"}
    for i in range(config.perceiver_config.resampler_depth):
        layer = f"{c}perceiver_resampler.layers.{i}."
        norms = ("input_latents_norm", "input_context_norm", "post_attention_layernorm")
        keys |= {f"{layer}{n}.weight" for n in norms}
        keys |= {f"{layer}self_attn.{p}_proj.weight" for p in "qkvo"}
        keys |= {f"{layer}mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    t = "model.text_model."
    keys |= {t + "embed_tokens.weight", t + "norm.weight"}
    for i in range(config.text_config.num_hidden_layers):
        layer = f"{t}layers.{i}."
        keys |= {layer + "input_layernorm.weight", layer + "post_attention_layernorm.weight"}
        keys |= {f"{layer}self_attn.{p}_proj.weight" for p in "qkvo"}
        keys |= {f"{layer}mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    return keys


def test_a_state_dict_under_the_published_names_loads_with_nothing_missing_or_unexpected(tmp_path):
    from safetensors.torch import save_file

    config = tiny_config()
    shapes = {k: v.shape for k, v in VideoScoreModel(tiny_config()).state_dict().items()}
    names = published_keys(config)
    assert names == set(shapes)
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(shapes[k], generator=generator) for k in sorted(names)}
    config.save_pretrained(tmp_path)
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    model, info = VideoScoreModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    loaded = model.state_dict()
    assert all(torch.equal(loaded[k], state[k]) for k in state)


def test_a_checkpoint_with_a_bias_free_head_loads_with_zero_bias(tmp_path):
    save_checkpoint(tmp_path)
    from safetensors.torch import load_file, save_file

    state = load_file(str(tmp_path / "model.safetensors"))
    del state["score.bias"]
    save_file(state, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    reward = load_videoscore(path=str(tmp_path))
    assert torch.equal(reward.model.score.bias, torch.zeros(5))


def test_missing_path_is_a_one_line_error(tmp_path):
    with pytest.raises(VpoError) as e:
        load_videoscore(path=str(tmp_path / "nowhere"))
    assert "\n" not in str(e.value) and "--reward-path" in str(e.value)


def test_a_plain_idefics2_checkpoint_without_the_head_is_rejected(tmp_path):
    from transformers import Idefics2Model

    Idefics2Model(tiny_config()).save_pretrained(tmp_path)
    save_tokenizer(tmp_path)
    with pytest.raises(VpoError, match="does not fit VideoScoreModel"):
        load_videoscore(path=str(tmp_path))


def test_checkpoints_of_the_wrong_shape_are_rejected(tmp_path, checkpoint):
    save_checkpoint(tmp_path / "three", tiny_config(num_labels=3))
    with pytest.raises(VpoError, match="3-output head"):
        load_videoscore(path=str(tmp_path / "three"))
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "wide").mkdir(exist_ok=True)
        (tmp_path / "wide" / name).write_bytes((checkpoint / name).read_bytes())
    config = json.loads((tmp_path / "wide" / "config.json").read_text())
    config["vision_config"]["intermediate_size"] = 48
    (tmp_path / "wide" / "config.json").write_text(json.dumps(config))
    with pytest.raises(VpoError) as e:
        load_videoscore(path=str(tmp_path / "wide"))
    assert "\n" not in str(e.value)


def test_options(checkpoint, tmp_path):
    with pytest.raises(VpoError, match="unknown option.*known options: frames, prompt_template, frame_pick"):
        load_videoscore(path=str(checkpoint), fps=8)
    with pytest.raises(VpoError, match="frame_pick must be upstream or spaced"):
        load_videoscore(path=str(checkpoint), frame_pick="random")
    with pytest.raises(VpoError, match="frames must be"):
        load_videoscore(path=str(checkpoint), frames=0)
    assert load_videoscore(path=str(checkpoint)).frames == 16
    assert load_videoscore(path=str(checkpoint), frames="5").frames == 5
    with pytest.raises(VpoError, match="not found"):
        load_videoscore(path=str(checkpoint), prompt_template=str(tmp_path / "missing.txt"))
    bad = tmp_path / "bad.txt"
    bad.write_text("no placeholder here")
    with pytest.raises(VpoError, match="placeholder"):
        load_videoscore(path=str(checkpoint), prompt_template=str(bad))


def test_frame_count_defaults_follow_the_checkpoint(tmp_path):
    """The config's count, else the model card's MAX_NUM_FRAMES; never the folder's name: a folder called v1.1 with
    neither is refused in one line naming the option."""
    carded = tmp_path / "carded"
    save_checkpoint(carded, card_frames=48)
    assert load_videoscore(path=str(carded)).frames == 48
    recorded = tmp_path / "recorded"
    save_checkpoint(recorded, tiny_config(num_frames=8), card_frames=None)
    assert load_videoscore(path=str(recorded), prompt_template="builtin").frames == 8
    named = tmp_path / "VideoScore-v1.1"
    save_checkpoint(named, card_frames=None)
    with pytest.raises(VpoError, match="records no frame count.*videoscore.frames=48"):
        load_videoscore(path=str(named), prompt_template="builtin")


def test_an_upstream_style_template_appends_the_frames(checkpoint, tmp_path):
    upstream_style = tmp_path / "template.txt"
    upstream_style.write_text('judge the video for the prompt "{text_prompt}" :\n')
    reward = load_videoscore(path=str(checkpoint), frames=2, prompt_template=str(upstream_style))
    ids, _ = reward.tokens(["a red circle"], 2)
    tokens = reward.tokenizer.convert_ids_to_tokens(ids[0].tolist())
    frame = [FAKE_TOKEN] + [IMAGE_TOKEN] * 4 + [FAKE_TOKEN]
    assert tokens[0] == "<s>" and tokens[-12:] == frame * 2 and tokens[-15:-12] == ["circle", '"', ":"]
    with torch.no_grad():
        assert torch.isfinite(reward(videos(b=1, t=2), PROMPTS[:1])["overall"]).all()


def test_build_query_and_resize_size():
    assert build_query("p={prompt} f={frames}!", "cat", "<F>") == "p=cat f=<F>!"
    assert build_query("p={text_prompt}\n", "cat", "<F> <F> ") == "p=cat\n<F> <F> "
    assert "{prompt}" in PROMPT_TEMPLATE and "{frames}" in PROMPT_TEMPLATE
    assert resize_size(480, 720, 378, 980) == (480, 720)  # small enough: unchanged
    assert resize_size(1080, 1920, 378, 980) == (551, 980)  # long side capped, short side truncated
    assert resize_size(1920, 1080, 378, 980) == (980, 551)
    assert resize_size(32, 32, 378, 980) == (378, 378)  # each side raised to shortest_edge
    assert resize_size(200, 3000, 378, 980) == (378, 980)  # 65 after capping, raised to 378 on its own


@pytest.mark.parametrize(("t", "n"), [(24, 16), (17, 16), (49, 48), (10, 16)])
def test_frames_are_picked_as_upstream_picks_them(t, n):
    """VideoScore's inference keeps floor(i * T / N) for i < N when T > N (so 17 frames to 16 drops the last),
    else every frame; the indices here are integer arithmetic, not the implementation's float arange."""
    from vpotool.rewards.videoscore import upstream_frames

    frames = torch.arange(t, dtype=torch.float32).view(1, t, 1, 1, 1)
    expected = [i * t // n for i in range(n)] if t > n else list(range(t))
    assert upstream_frames(frames, n).flatten().long().tolist() == expected


def test_the_model_cards_instruction_is_the_default_template(checkpoint, tmp_path):
    """A checkpoint whose README.md prints ``REGRESSION_QUERY_PROMPT`` is queried with that text; ``prompt_template``
    overrides it (``builtin``: vpotool's own); a folder without a card and without the option is refused in one
    line, never scored with another instruction silently."""
    reward = load_videoscore(path=str(checkpoint), frames=2)
    assert reward.template == TEST_INSTRUCTION and reward.pick == "upstream"
    query = build_query(reward.template, "a red circle", "<F> ")
    assert query == 'Score the clip for the text prompt "a red circle".\nFrames:\n<F> '
    own = tmp_path / "own.txt"
    own.write_text("score {prompt}")
    assert load_videoscore(path=str(checkpoint), prompt_template=str(own)).template == "score {prompt}"
    assert load_videoscore(path=str(checkpoint), prompt_template="builtin").template == PROMPT_TEMPLATE
    bare = tmp_path / "bare"
    save_checkpoint(bare, card_frames=None)
    with pytest.raises(VpoError, match="no model card .*videoscore.prompt_template=FILE"):
        load_videoscore(path=str(bare), frames=2)
