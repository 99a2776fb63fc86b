"""Test-only ComfyUI nodes. ComfyUI's loader builds umt5 at its full 5.7B size, so the text-ranking tests use a tiny
umt5-shaped encoder built from ComfyUI's own T5 and tokenizer classes (the random text conditioning of the tiny
fixtures is in ``memlearner_host/comfy_nodes``)."""

import functools
import io as _io

import torch
from comfy_api.latest import ComfyExtension, io
from typing_extensions import override

TINY_UMT5 = {"d_ff": 64, "d_kv": 16, "d_model": 64, "dense_act_fn": "gelu_pytorch_tanh", "is_gated_act": True,
             "layer_norm_epsilon": 1e-6, "model_type": "umt5", "num_heads": 4, "num_layers": 2,
             "relative_attention_num_buckets": 32, "vocab_size": 64}
CORPUS = ["a red car drives along a coastal road", "a cat sleeps on a sofa", "waves crash on rocks at sunset",
          "a stone courtyard with a fountain", "people walk through a busy market", "snow falls on a pine forest"]


@functools.cache
def tiny_spiece_model() -> bytes:
    """A small sentencepiece model with umt5's special ids (pad 0, end 1)."""
    import sentencepiece

    out = _io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20), model_writer=out, vocab_size=48, hard_vocab_limit=False,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2)
    return out.getvalue()


def tiny_umt5_clip(seed: int):
    """A real ``comfy.sd.CLIP`` shaped like ComfyUI's Wan umt5 encoder (masked padding zeroed), 64 wide."""
    import comfy.sd
    import comfy.sd1_clip
    import comfy.supported_models_base
    import comfy.text_encoders.t5
    import comfy.text_encoders.wan as wan_te

    class TinyUMT5(comfy.sd1_clip.SDClipModel):
        def __init__(self, device="cpu", layer="last", layer_idx=None, dtype=None, model_options=None):
            super().__init__(device=device, layer=layer, layer_idx=layer_idx, textmodel_json_config=dict(TINY_UMT5),
                             dtype=dtype, special_tokens={"end": 1, "pad": 0}, model_class=comfy.text_encoders.t5.T5,
                             enable_attention_masks=True, zero_out_masked=True, model_options=model_options or {})

    class TinyTE(wan_te.WanT5Model):
        def __init__(self, device="cpu", dtype=None, model_options=None):
            super().__init__(device=device, dtype=torch.float32, model_options={**(model_options or {}), "umt5xxl_class": TinyUMT5})

    class Tokenizer(wan_te.WanT5Tokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data=None):
            super().__init__(embedding_directory, {**(tokenizer_data or {}), "spiece_model": tiny_spiece_model()})

    target = comfy.supported_models_base.ClipTarget(Tokenizer, TinyTE)
    clip = comfy.sd.CLIP(target, model_options={"dtype": torch.float32})
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in clip.cond_stage_model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (1.0 if p.ndim == 1 else 0.0))
    return clip


class TinyTextEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MemLearnerTestTinyTextEncoder",
            display_name="Tiny umt5 Text Encoder (tests)",
            category="memlearner/testing",
            inputs=[io.Int.Input("seed", default=0, min=0, max=2**31 - 1)],
            outputs=[io.Clip.Output()],
        )

    @classmethod
    def execute(cls, seed) -> io.NodeOutput:
        return io.NodeOutput(tiny_umt5_clip(seed))


def memory_in_use() -> dict:
    """What the process still holds after a garbage collection: bytes of live torch tensors (each storage once)
    and, on CUDA, the allocator's allocated bytes."""
    import gc

    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor) and obj.device.type != "meta":
                s = obj.untyped_storage()
                storages[(s.device.type, s.data_ptr())] = s.nbytes()
        except Exception:  # objects that die or refuse inspection mid-scan
            continue
    cuda = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    return {"tensor_bytes": sum(storages.values()), "cuda_allocated": cuda}


class MemoryStats(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MemLearnerTestMemoryStats",
            display_name="Memory In Use (tests)",
            category="memlearner/testing",
            description="Unloads all models, collects garbage, and reports the memory still held.",
            inputs=[io.Int.Input("tag", default=0, min=0, max=2**31 - 1, tooltip="Any value; a new one reruns.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, tag) -> io.NodeOutput:
        import comfy.model_management as mm

        mm.unload_all_models()
        mm.soft_empty_cache()
        return io.NodeOutput(ui={"memory": [memory_in_use()]})


class TestExtension(ComfyExtension):
    @override
    async def get_node_list(self):
        return [TinyTextEncoder, MemoryStats]


async def comfy_entrypoint():
    return TestExtension()
