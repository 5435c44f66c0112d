"""Hugging Face export / import / upcycling against the real `transformers` package (offline)."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil

import pytest
import torch

pytest.importorskip("transformers")
os.environ["HF_HUB_OFFLINE"] = "1"

from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)
from transformers.utils import logging as hf_logging  # noqa: E402

from minimoe.cli.main import main  # noqa: E402
from minimoe.config import ModelConfig  # noqa: E402
from minimoe.data import Tokenizer  # noqa: E402
from minimoe.data.chat_template import SFT_CHAT_TEMPLATE  # noqa: E402
from minimoe.errors import MinimoeError  # noqa: E402
from minimoe.hf.export import export_model, parse_size  # noqa: E402
from minimoe.hf.load import import_hf, load_tensors  # noqa: E402
from minimoe.hf.upcycle import upcycle, upcycle_config, upcycle_state_dict  # noqa: E402
from minimoe.model.transformer import Transformer  # noqa: E402
from minimoe.train.checkpoint import load_run, write_run  # noqa: E402

hf_logging.set_verbosity_error()  # the MTP layer is "unexpected" for transformers unless it is layer 61

TOL = 1e-4
YARN = {
    "type": "yarn",
    "factor": 4.0,
    "original_max_position_embeddings": 16,
    "beta_fast": 32,
    "beta_slow": 1,
}
BASE = dict(
    vocab_size=320, hidden_size=32, num_hidden_layers=3, num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=8,
    qk_rope_head_dim=8, v_head_dim=8, intermediate_size=64, moe_intermediate_size=24, n_routed_experts=8,
    num_experts_per_tok=2, max_position_embeddings=64, first_k_dense_replace=1, initializer_range=0.2,
)  # fmt: skip
CASES = {
    # MLA, sigmoid, shared expert, group-limited routing with a nonzero bias, YaRN, low-rank q, MTP
    "deepseek_v3": dict(
        n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5, mtp_depth=1, q_lora_rank=12,
        rope_scaling={**YARN, "mscale": 1.0, "mscale_all_dim": 1.0},
    ),
    "deepseek_v3_plain": dict(n_shared_experts=0, first_k_dense_replace=0, num_experts_per_tok=1, tie_word_embeddings=True),
    "deepseek_v2": dict(
        scoring_func="softmax", norm_topk_prob=False, aux_free_bias=False, n_group=4, topk_group=2, routed_scaling_factor=2.0,
    ),
    # dense MLA: every layer dense (first_k_dense_replace = num_hidden_layers in config.json)
    "deepseek_v3_dense": dict(n_routed_experts=0, first_k_dense_replace=0),
    "glm4_moe": dict(
        attn_type="gqa", num_key_value_heads=1, n_group=2, topk_group=1, routed_scaling_factor=1.5, mtp_depth=1,
        rope_scaling={**YARN, "mscale": 1.0, "mscale_all_dim": 0.8},
    ),
    "mixtral": dict(
        attn_type="gqa", num_key_value_heads=1, scoring_func="softmax", aux_free_bias=False, n_shared_experts=0,
        first_k_dense_replace=0, routed_scaling_factor=2.0, rope_scaling=YARN,
    ),
    "qwen2_moe": dict(
        attn_type="gqa", scoring_func="softmax", aux_free_bias=False, n_shared_experts=2, head_dim=12,
        rope_scaling={**YARN, "mscale_all_dim": 1.0},
    ),
}  # fmt: skip


def _model(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(ModelConfig(**{**BASE, **kw})).eval()
    with torch.no_grad():
        for mod in m.moe_layers().values():
            if mod.gate.e_score_correction_bias is not None:
                mod.gate.e_score_correction_bias.normal_(0, 0.3)  # selection differs from the unbiased one
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return m


def _logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits.float()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    t = Tokenizer.byte()
    t.chat_template = "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    return t


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 258, (2, 40), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tok):
    """Each case exported once: name -> (model, folder, ExportResult)."""
    root = tmp_path_factory.mktemp("export")
    out = {}
    for name, kw in CASES.items():
        m = _model(**kw)
        out[name] = (m, root / name, export_model(m, tok, root / name))
    return out


def test_the_exported_mtp_layer_predicts_in_transformers_as_in_minimoe(exported, ids):
    """An external check of the MTP module: transformers' own `MtpLayer` (its DeepSeek-V3 decoder layer as
    the block, enorm/hnorm/eh_proj and shared_head.norm as the post-norm), loaded from the exported layer
    L, fed the main model's last hidden state and the next token's embedding, gives the depth-1 loss
    minimoe's model computes."""
    import torch.nn.functional as F
    from safetensors.torch import load_file
    from transformers.modeling_layers import MtpLayer
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3DecoderLayer, DeepseekV3RMSNorm

    model, folder, _ = exported["deepseek_v3"]
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    L = model.cfg.num_hidden_layers
    layer = MtpLayer(hf.config, DeepseekV3DecoderLayer, DeepseekV3RMSNorm, layer_idx=L).eval()
    stored = {}
    for f in folder.glob("*.safetensors"):
        stored.update(load_file(f))
    prefix, own = f"model.layers.{L}.", {}
    for key, t in stored.items():
        if not key.startswith(prefix):
            continue
        rest = key[len(prefix) :]
        if rest.split(".")[0] in ("enorm", "hnorm", "eh_proj"):
            own[rest] = t
        elif rest.startswith("shared_head.norm."):
            own["post_norm." + rest.removeprefix("shared_head.norm.")] = t
        elif not rest.startswith(("embed_tokens.", "shared_head.head.", "mlp.experts.")):
            own["mtp_block." + rest] = t
    # the hub's per-expert matrices, stacked as transformers' experts hold them (gate and up in one)
    E = model.cfg.n_routed_experts
    expert = [
        {p: stored[f"{prefix}mlp.experts.{e}.{p}.weight"] for p in ("gate_proj", "up_proj", "down_proj")}
        for e in range(E)
    ]
    own["mtp_block.mlp.experts.gate_up_proj"] = torch.stack(
        [torch.cat([w["gate_proj"], w["up_proj"]]) for w in expert]
    )
    own["mtp_block.mlp.experts.down_proj"] = torch.stack([w["down_proj"] for w in expert])
    layer.load_state_dict(own, strict=True)
    x, y = ids[:, :-1], ids[:, 1:]
    T = x.shape[1]
    with torch.no_grad():
        ours = model(x, targets=y).losses["mtp"]
        h = hf.model(x).last_hidden_state  # after the final norm, what minimoe's depth 1 reads
        position_ids = torch.arange(T - 1).unsqueeze(0)
        rope = hf.model.rotary_emb(h, position_ids)
        out = layer(hf.model.embed_tokens(x[:, 1:]), h[:, :-1], rope, None, position_ids, None)
        theirs = F.cross_entropy(hf.lm_head(out).flatten(0, 1), y[:, 1:].flatten())
    assert abs(ours.item() - theirs.item()) <= TOL


def test_the_latent_norms_keep_their_own_epsilon(tmp_path, tok, ids):
    """MLA's latent norms (q_a_layernorm, kv_a_layernorm) use 1e-6 whatever rms_norm_eps says, as
    transformers builds them: with a model eps of 1e-2 and small latents the eps shows in the logits, so
    a latent norm built with the model's eps would not match the exported model in transformers."""
    m = _model(**{**CASES["deepseek_v3"], "rms_norm_eps": 1e-2})
    with torch.no_grad():
        for layer in m.layers:
            layer.self_attn.q_a_proj.weight.mul_(0.01)  # latents' mean square ~1e-4: eps 1e-2 would dominate
            layer.self_attn.kv_a_proj_with_mqa.weight.mul_(0.01)
    export_model(m, tok, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert (_logits(m, ids) - _logits(hf, ids)).abs().max().item() <= TOL


@pytest.mark.parametrize("tie", [False, True])
def test_the_checkpoint_count_is_what_the_export_writes(tmp_path, tok, tie):
    """`minimoe params`' count of a DeepSeek-V3 checkpoint (main model, MTP layers and the embedding and
    head copies each MTP layer stores) is the number of values the export writes, tied or not."""
    from safetensors import safe_open

    from minimoe.params import count_params

    m = _model(**{**CASES["deepseek_v3"], "tie_word_embeddings": tie, "mtp_depth": 2})
    export_model(m, tok, tmp_path / "hf")
    written = 0
    for f in (tmp_path / "hf").glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            written += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    assert count_params(m.cfg).hf_checkpoint_total == written


@pytest.mark.parametrize("name", list(CASES))
def test_export_loads_in_transformers_with_same_logits(exported, ids, name):
    model, folder, res = exported[name]
    assert res.format == name.removesuffix("_plain").removesuffix("_dense")
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    assert type(hf).__name__ == json.loads((folder / "config.json").read_text())["architectures"][0]
    ours, theirs = _logits(model, ids), _logits(hf, ids)
    assert ours.abs().max() > 1.0  # logits large enough that a wrong weight would show
    assert (ours - theirs).abs().max().item() <= TOL


def test_export_config_has_deepseek_v3_keys(exported):
    c = json.loads((exported["deepseek_v3"][1] / "config.json").read_text())
    for key in ("kv_lora_rank", "q_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "n_routed_experts",
                "n_shared_experts", "num_experts_per_tok", "moe_intermediate_size", "first_k_dense_replace", "n_group",
                "topk_group", "routed_scaling_factor", "norm_topk_prob", "rope_scaling"):  # fmt: skip
        assert key in c, key
    assert c["topk_method"] == "noaux_tc" and c["scoring_func"] == "sigmoid" and c["rope_interleave"] is True
    assert c["num_nextn_predict_layers"] == 1 and c["rope_scaling"]["type"] == "yarn"
    from safetensors import safe_open

    with safe_open(str(exported["deepseek_v3"][1] / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in keys  # per-expert hub names
    for part in ("enorm", "hnorm", "eh_proj", "shared_head.norm", "shared_head.head", "embed_tokens"):
        assert any(k.startswith(f"model.layers.3.{part}.") for k in keys), (
            part
        )  # MTP = layer num_hidden_layers
    gen = json.loads((exported["deepseek_v3"][1] / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 256


def test_export_special_token_ids_are_the_tokenizers(exported, tok):
    """config.json and generation_config.json carry the tokenizer's own ids (the byte tokenizer has
    end-of-text 256, padding 257 and no beginning-of-text token)."""
    assert (tok.eos_id, tok.pad_id, tok.bos_id) == (256, 257, None)
    folder = exported["deepseek_v3"][1]
    c = json.loads((folder / "config.json").read_text())
    assert (c["eos_token_id"], c["pad_token_id"], c["bos_token_id"]) == (256, 257, None)
    gen = json.loads((folder / "generation_config.json").read_text())
    assert gen == {"eos_token_id": 256, "pad_token_id": 257}


def test_mtp_layer_holds_its_own_weights_and_copies_of_embedding_and_head():
    """DeepSeek-V3's hub layout of MTP module k (layer num_hidden_layers + k): enorm, hnorm, eh_proj and
    shared_head.norm are that module's tensors, embed_tokens and shared_head.head copies of the model's
    embedding and (untied) LM head, and its decoder block the module's block; every module has them."""
    from minimoe.hf.export import hub_tensors

    model = _model(**{**CASES["deepseek_v3"], "mtp_depth": 2})
    sd = model.state_dict()
    hub, _ = hub_tensors(dict(sd), model.cfg, "deepseek_v3", 2)
    L = model.cfg.num_hidden_layers
    assert not torch.equal(sd["embed_tokens.weight"], sd["lm_head.weight"])
    assert not torch.equal(sd["mtp.0.enorm.weight"], sd["mtp.0.hnorm.weight"])
    assert not torch.equal(sd["mtp.0.eh_proj.weight"], sd["mtp.1.eh_proj.weight"])
    for k in range(2):
        want = {
            "enorm.weight": f"mtp.{k}.enorm.weight",
            "hnorm.weight": f"mtp.{k}.hnorm.weight",
            "eh_proj.weight": f"mtp.{k}.eh_proj.weight",
            "shared_head.norm.weight": f"mtp.{k}.norm.weight",
            "embed_tokens.weight": "embed_tokens.weight",
            "shared_head.head.weight": "lm_head.weight",
            "self_attn.o_proj.weight": f"mtp.{k}.block.self_attn.o_proj.weight",
            "input_layernorm.weight": f"mtp.{k}.block.input_layernorm.weight",
            "mlp.experts.7.down_proj.weight": f"mtp.{k}.block.mlp.experts.down_proj",
        }
        for hub_part, ours in want.items():
            theirs = hub[f"model.layers.{L + k}.{hub_part}"]
            assert torch.equal(theirs, sd[ours][7] if ".experts.7." in hub_part else sd[ours]), (k, hub_part)
    assert not [n for n in hub if n.startswith(f"model.layers.{L + 2}.")]


@pytest.mark.parametrize(
    "extra",
    [
        {},  # HF: mscale(factor) on cos/sin, minimoe the same
        {"mscale": 0.707, "mscale_all_dim": 0.707},
        {"mscale_all_dim": 1.0},  # softmax scale only
        {"mscale": 0.0, "mscale_all_dim": 1.0},  # HF tests truthiness: the exporter pins attention_factor
        {"mscale": 1.0, "mscale_all_dim": 0.5},
        {"beta_fast": 16.0, "beta_slow": 2.0},  # not transformers' defaults (32, 1)
    ],
)
def test_export_yarn_variants_match_transformers(tmp_path, tok, ids, extra):
    """MLA + YaRN: the logits agree at positions beyond original_max_position_embeddings for every way
    of giving mscale / mscale_all_dim, config.json carries every YaRN field as given (the betas only
    move frequencies at long contexts; mscale solved where vLLM would read the keys as given otherwise:
    mscale_all_dim alone), vLLM's reading of the cos/sin factor is minimoe's, and the export imports back
    with the same logits."""
    from minimoe.model.rope import yarn_attention_factor, yarn_get_mscale

    m = _model(rope_scaling={**YARN, **extra}, max_position_embeddings=128)
    assert ids.shape[1] > YARN["original_max_position_embeddings"]
    export_model(m, tok, tmp_path / "hf")
    c = json.loads((tmp_path / "hf" / "config.json").read_text())
    solved = extra.keys() == {"mscale_all_dim"}
    for key, value in {**YARN, **extra}.items():
        assert c["rope_scaling"][key] == value and (key == "type" or c["rope_parameters"][key] == value), key
    assert ("mscale" in c["rope_scaling"]) == ("mscale" in extra or solved)
    # vLLM's DeepseekScalingRotaryEmbedding: mscale(f, mscale) / mscale(f, mscale_all_dim), absent keys 1 and 0
    rs, f = c["rope_scaling"], YARN["factor"]
    vllm = yarn_get_mscale(f, rs.get("mscale", 1)) / yarn_get_mscale(f, rs.get("mscale_all_dim", 0))
    assert vllm == pytest.approx(yarn_attention_factor({**YARN, **extra}), rel=1e-12)
    if solved:
        assert vllm != pytest.approx(yarn_get_mscale(f, 1) / yarn_get_mscale(f, extra["mscale_all_dim"]))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert (_logits(m, ids) - _logits(hf, ids)).abs().max().item() <= TOL
    import_hf(tmp_path / "hf", tmp_path / "run")
    back = load_run(tmp_path / "run")[0]
    assert (_logits(back, ids) - _logits(m, ids)).abs().max().item() <= 1e-5


def test_exported_tokenizer_loads_with_auto_tokenizer(exported, tok):
    hf_tok = AutoTokenizer.from_pretrained(exported["deepseek_v3"][1])
    text = "hello <|endoftext|> wörld"
    assert hf_tok(text)["input_ids"] == tok.encode(text)
    assert hf_tok.eos_token_id == tok.eos_id and hf_tok.decode(tok.encode("héllo")) == "héllo"
    assert hf_tok.model_max_length == exported["deepseek_v3"][0].cfg.max_position_embeddings
    assert (
        hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi<|endoftext|>"
    )


def test_an_exported_run_without_a_template_formats_chat_as_the_server_does(tmp_path):
    """A pre-training run has no chat template; its export carries the plain one `minimoe serve` uses,
    so transformers' apply_chat_template gives the server's prompt (it raised before), while minimoe's
    own tokenizer record keeps none."""
    from minimoe.data import Tokenizer
    from minimoe.data.chat_template import render_plain
    from minimoe.hf.export import write_tokenizer_files

    write_tokenizer_files(Tokenizer.byte(), tmp_path, 64)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and?"}]  # fmt: skip
    hf_tok = AutoTokenizer.from_pretrained(tmp_path)
    got = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert (
        got
        == render_plain(messages)
        == "system: Be brief.\nuser: hi\nassistant: hello\nuser: and?\nassistant:"
    )
    assert Tokenizer.load(tmp_path).chat_template is None  # what `minimoe import` reads back


@pytest.mark.parametrize("name", list(CASES))
def test_export_import_round_trip(exported, tmp_path, ids, name):
    model, folder, res = exported[name]
    ckpt, fmt, _ = import_hf(folder, tmp_path / "run")
    back, tok2, cfg, _ = load_run(tmp_path / "run")
    assert fmt == res.format and cfg.model.mtp_depth == model.cfg.mtp_depth
    assert cfg.model.tie_word_embeddings == model.cfg.tie_word_embeddings
    assert (
        (_logits(back, ids) - _logits(model, ids)).abs().max().item() <= 5e-5
    )  # fp32 round-off: the weights are equal, the kernels may sum in another order
    if name == "deepseek_v3":  # lossless: every tensor, MTP and balancing bias included
        a, b = model.state_dict(), back.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    "kw",
    [
        dict(aux_free_bias=False, mtp_depth=1),  # the MTP block gets a zero bias too, as the main layers
        {**CASES["mixtral"], "n_routed_experts": 4},  # not MixtralConfig's default of 8
    ],
)
def test_export_matches_transformers_and_imports_back_where_defaults_hide_slips(tmp_path, tok, ids, kw):
    m = _model(**kw)
    export_model(m, tok, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert (_logits(m, ids) - _logits(hf, ids)).abs().max().item() <= TOL
    import_hf(tmp_path / "hf", tmp_path / "run")
    back = load_run(tmp_path / "run")[0]
    assert back.cfg.mtp_depth == m.cfg.mtp_depth
    assert (_logits(back, ids) - _logits(m, ids)).abs().max().item() <= 1e-5


def test_import_of_a_tied_checkpoint_that_also_saves_the_head(exported, tmp_path, ids):
    """Some tools write lm_head.weight although config.json ties it to the embedding: imported all the same."""
    from safetensors.torch import load_file, save_file

    model, folder, _ = exported["deepseek_v3_plain"]
    assert model.cfg.tie_word_embeddings
    shutil.copytree(folder, tmp_path / "hf")
    sd = load_file(str(folder / "model.safetensors"))
    save_file(
        {**sd, "lm_head.weight": sd["model.embed_tokens.weight"].clone()},
        str(tmp_path / "hf" / "model.safetensors"),
    )
    import_hf(tmp_path / "hf", tmp_path / "run")
    assert (_logits(load_run(tmp_path / "run")[0], ids) - _logits(model, ids)).abs().max().item() <= 1e-5


def test_export_writes_the_routing_keys_vllm_reads(exported):
    """vLLM and SGLang pick the V3 router by topk_method / scoring_func: noaux_tc and sigmoid for every
    deepseek_v3 and glm4_moe export, also one without expert groups."""
    for name in ("deepseek_v3", "deepseek_v3_plain", "glm4_moe"):
        c = json.loads((exported[name][1] / "config.json").read_text())
        assert (c["topk_method"], c["scoring_func"]) == ("noaux_tc", "sigmoid"), name


def test_import_of_a_config_without_norm_topk_prob_follows_transformers(exported, tmp_path, ids):
    """Glm4MoeConfig renormalises the top-k weights when config.json does not say (as DeepseekV3Config)."""
    lean = tmp_path / "lean"
    shutil.copytree(exported["glm4_moe"][1], lean)
    c = json.loads((lean / "config.json").read_text())
    (lean / "config.json").write_text(json.dumps({k: v for k, v in c.items() if k != "norm_topk_prob"}))
    theirs = AutoModelForCausalLM.from_pretrained(lean, dtype=torch.float32).eval()
    import_hf(lean, tmp_path / "run")
    back = load_run(tmp_path / "run")[0]
    assert back.cfg.norm_topk_prob
    assert (_logits(back, ids) - _logits(theirs, ids)).abs().max().item() <= TOL


def test_import_reads_every_mtp_layer_and_clips_first_k_dense_replace(tmp_path, tok):
    """Two MTP modules round-trip exactly; a first_k_dense_replace beyond the layers (transformers: every
    layer dense) imports as num_hidden_layers."""
    from minimoe.hf.import_config import model_config

    m = _model(**{**CASES["deepseek_v3"], "mtp_depth": 2})
    export_model(m, tok, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "run")
    back = load_run(tmp_path / "run")[0]
    assert back.cfg.mtp_depth == 2
    ours, theirs = m.state_dict(), back.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    c = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert c["num_nextn_predict_layers"] == 2
    # a config.json that lists fewer: the layers the checkpoint holds are imported, with a note
    (tmp_path / "hf" / "config.json").write_text(json.dumps({**c, "num_nextn_predict_layers": 1}))
    _, _, notes = import_hf(tmp_path / "hf", tmp_path / "run2")
    assert load_run(tmp_path / "run2")[0].cfg.mtp_depth == 2
    assert notes == ["config.json lists 1 MTP layer(s), the checkpoint holds 2: imported 2"]
    L = c["num_hidden_layers"]
    cfg, _, _ = model_config({**c, "first_k_dense_replace": L + 2}, {})
    assert cfg.first_k_dense_replace == L and not any(cfg.is_moe_layer(i) for i in range(L))


def test_sharded_export_loads(tmp_path, tok, ids):
    m = _model(**CASES["deepseek_v3"])
    res = export_model(m, tok, tmp_path / "hf", shard_size="40KB", dtype="float32")
    shards = [f for f in res.files if f.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors.index.json" in res.files
    index = json.loads((tmp_path / "hf" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    from safetensors import safe_open

    total = 0
    for shard in shards:  # every tensor sits in the shard the index names; total_size counts their bytes
        with safe_open(str(tmp_path / "hf" / shard), "pt") as f:
            for k in f.keys():
                assert index["weight_map"][k] == shard
                t = f.get_tensor(k)
                total += t.numel() * t.element_size()
    assert index["metadata"]["total_size"] == total == res.weight_bytes and len(index["weight_map"]) > 0
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert (_logits(m, ids) - _logits(hf, ids)).abs().max().item() <= TOL
    import_hf(tmp_path / "hf", tmp_path / "run")
    assert (_logits(load_run(tmp_path / "run")[0], ids) - _logits(m, ids)).abs().max().item() <= 1e-5
    with pytest.raises(MinimoeError, match="already exists"):
        export_model(m, tok, tmp_path / "hf")


def test_bf16_export_keeps_bias_fp32(tmp_path, tok):
    export_model(_model(**CASES["deepseek_v3"]), tok, tmp_path / "hf", dtype="bfloat16")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "hf" / "model.safetensors"), "pt") as f:
        assert f.get_tensor("model.layers.1.mlp.gate.e_score_correction_bias").dtype == torch.float32
        assert f.get_tensor("model.layers.1.mlp.gate.weight").dtype == torch.bfloat16
    c = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert c["torch_dtype"] == c["dtype"] == "bfloat16"  # what the weights on disk are
    assert parse_size("5GB") == 5_000_000_000 and parse_size("2MiB") == 2 * 2**20


@pytest.mark.parametrize(
    "kw, fmt, match",
    [
        (dict(expert_act="gelu"), None, "GELU experts"),
        (dict(scoring_func="softmax", aux_free_bias=False), None, "norm_topk_prob"),
        (dict(capacity_factor=1.25), None, "capacity_factor"),
        (dict(attn_type="gqa", scoring_func="softmax"), None, "bias is nonzero"),
        (dict(attn_type="gqa", scoring_func="softmax", aux_free_bias=False, n_group=4, topk_group=2), None, "group-limited"),
        (dict(attn_type="gqa", scoring_func="softmax", aux_free_bias=False), "mixtral", "shared experts"),
        (dict(), "mixtral", "GQA attention"),
    ],
)  # fmt: skip
def test_export_refuses_what_the_format_cannot_express(tmp_path, tok, kw, fmt, match):
    with pytest.raises(MinimoeError, match=match):
        export_model(_model(**kw), tok, tmp_path / "hf", fmt=fmt)
    assert not (tmp_path / "hf").exists()


def test_dropless_export_is_explicit(tmp_path, tok, ids):
    m = _model(capacity_factor=1.0)
    res = export_model(m, tok, tmp_path / "hf", dropless=True)
    assert any("dropless" in n for n in res.notes)


@pytest.mark.parametrize("name", ["deepseek_v3", "glm4_moe"])
def test_lora_adapter_loads_on_the_exported_model_with_peft(tmp_path, tok, ids, name):
    """A minimoe LoRA adapter (attention and stacked experts) rewritten by `export_adapter` gives the
    same logits under `PeftModel.from_pretrained(exported_model)` as on the minimoe model; the adapter
    as saved matches no module names there and would change nothing."""
    import copy

    from peft import PeftModel

    from minimoe.finetune.lora import apply_lora, save_adapter
    from minimoe.hf.export import export_adapter

    model = _model(**CASES[name])
    base = copy.deepcopy(model)
    export_model(base, tok, tmp_path / "hf")
    pm = apply_lora(model, r=2, alpha=6, targets=["attention", "experts"])
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    save_adapter(pm.eval(), tmp_path / "adapter")
    export_adapter(tmp_path / "adapter", base.cfg, tmp_path / "hf", tmp_path / "hf_adapter")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    theirs = _logits(PeftModel.from_pretrained(hf, tmp_path / "hf_adapter").eval(), ids)
    ours = _logits(pm, ids)
    assert (ours - _logits(base, ids)).abs().max() > 1.0  # the adapter changes the logits visibly
    assert (ours - theirs).abs().max().item() <= TOL
    pm_mlp = apply_lora(copy.deepcopy(base), r=2, alpha=6, targets=["mlp"])
    save_adapter(pm_mlp, tmp_path / "mlp_adapter")
    with pytest.raises(MinimoeError, match="PEFT cannot load"):
        export_adapter(tmp_path / "mlp_adapter", base.cfg, tmp_path / "hf", tmp_path / "x")


def _export_adapter_argv(tmp_path) -> list[str]:
    """`minimoe export RUN --out HF --adapter ADAPTER` for the run and adapter a test wrote in tmp_path."""
    run, hf, adapter = (str(tmp_path / name) for name in ("run", "hf", "adapter"))
    return ["export", run, "--out", hf, "--adapter", adapter]


def test_cli_export_writes_the_adapter_and_verifies_it(tmp_path, tok, ids, capsys):
    """`minimoe export RUN --adapter A --verify`: the adapter lands in OUT/adapter under the exported
    model's names, PEFT loads it there, and the check compares the adapted logits too."""
    from peft import PeftModel

    from minimoe.finetune.lora import apply_lora, save_adapter

    model = _model(**CASES["deepseek_v3"])
    write_run(tmp_path / "run", model, tok, {"source": "test"})
    pm = apply_lora(copy.deepcopy(model), r=2, alpha=6, targets=["attention", "experts"])
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    tuned = copy.deepcopy(tok)
    tuned.chat_template = SFT_CHAT_TEMPLATE  # what `minimoe lora` trained the adapter on
    save_adapter(pm.eval(), tmp_path / "adapter", tokenizer=tuned)
    argv = _export_adapter_argv(tmp_path)
    assert main([*argv, "--verify"]) == 0
    out = capsys.readouterr().out
    assert (
        "adapter/ (LoRA adapter, PEFT format, with the tokenizer and chat template it was trained with)"
        in out
    )
    # the adapter's folder formats chat as the adapter learned it; the model's folder keeps the base run's
    chat = [{"role": "user", "content": "hi"}]
    for folder, want in (
        (tmp_path / "hf" / "adapter", "<|user|>\nhi<|endoftext|>"),
        (tmp_path / "hf", "hi<|endoftext|>"),
    ):
        assert AutoTokenizer.from_pretrained(folder).apply_chat_template(chat, tokenize=False) == want, folder
    assert float(out.split("(with the adapter):")[1].split()[0]) <= TOL
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    adapted = PeftModel.from_pretrained(hf, tmp_path / "hf" / "adapter").eval()
    assert (_logits(adapted, ids) - _logits(pm, ids)).abs().max().item() <= TOL
    assert (_logits(pm, ids) - _logits(model, ids)).abs().max().item() > 1.0  # the adapter does something
    # a folder that is not an adapter: one sentence, before anything is written
    assert main([*argv[:3], str(tmp_path / "hf2"), "--adapter", str(tmp_path / "run")]) == 2
    assert "holds no adapter_config.json" in capsys.readouterr().err and not (tmp_path / "hf2").exists()
    # an adapter trained on other weights (another run of the same shape): refused before anything is written
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.layers[0].self_attn.o_proj.weight.mul_(1.01)
    write_run(tmp_path / "other", other, tok, {"source": "test"})
    assert (
        main(["export", str(tmp_path / "other"), "--out", str(tmp_path / "hf3"), "--adapter", argv[-1]]) == 2
    )
    err = capsys.readouterr().err
    assert "was trained on other weights" in err and not (tmp_path / "hf3").exists()


# ------------------------------------------------------------------ checkpoints made by transformers

HF_COMMON = dict(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=64)  # fmt: skip


def _scaled(m):
    """Weights large enough that a misplaced tensor changes the logits visibly."""
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
            elif "norm" in name:
                p.uniform_(0.5, 1.5)
    return m.eval()


def _hf_models():
    yarn = {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 32, "mscale": 0.707,
            "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1}  # fmt: skip
    v3 = DeepseekV3Config(**HF_COMMON, moe_intermediate_size=16, n_shared_experts=1, n_routed_experts=8,
                          kv_lora_rank=16, q_lora_rank=8, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8,
                          n_group=4, topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1, rope_scaling=yarn)  # fmt: skip
    v3_half = DeepseekV3Config(**HF_COMMON, moe_intermediate_size=16, n_shared_experts=0, n_routed_experts=4,
                               kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8,
                               n_group=1, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=0,
                               rope_interleave=False)  # fmt: skip
    mixtral = MixtralConfig(**HF_COMMON, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    qwen = Qwen2MoeConfig(**HF_COMMON, num_key_value_heads=2, num_experts=4, num_experts_per_tok=2,
                          moe_intermediate_size=16, shared_expert_intermediate_size=32, qkv_bias=True,
                          mlp_only_layers=[0])  # fmt: skip
    return {
        "deepseek_v3": DeepseekV3ForCausalLM(v3),
        "deepseek_v3_half_split_rope": DeepseekV3ForCausalLM(v3_half),
        "mixtral": MixtralForCausalLM(mixtral),
        "qwen2_moe": Qwen2MoeForCausalLM(qwen),
    }


@pytest.fixture(scope="module")
def hf_saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_made")
    out = {}
    torch.manual_seed(0)
    for name, m in _hf_models().items():
        _scaled(m)
        with torch.no_grad():
            for layer in m.model.layers:
                gate = getattr(layer.mlp, "gate", None)
                if getattr(gate, "e_score_correction_bias", None) is not None:
                    gate.e_score_correction_bias.normal_(0, 0.3)
                if hasattr(layer.mlp, "shared_expert_gate"):
                    layer.mlp.shared_expert_gate.weight.zero_()  # a learned gate is refused, see below
                for proj in ("q_proj", "k_proj", "v_proj"):
                    b = getattr(getattr(layer.self_attn, proj, None), "bias", None)
                    if b is not None:
                        b.zero_()
        m.save_pretrained(root / name)
        out[name] = (m, root / name)
    return out


@pytest.mark.parametrize("name", ["deepseek_v3", "deepseek_v3_half_split_rope", "mixtral", "qwen2_moe"])
def test_import_checkpoint_made_by_transformers(hf_saved, tmp_path, name):
    hf, folder = hf_saved[name]
    ckpt, fmt, notes = import_hf(folder, tmp_path / "run", tokenizer="byte")
    ours = load_run(tmp_path / "run")[0]
    x = torch.randint(0, 258, (2, 30), generator=torch.Generator().manual_seed(1))
    theirs = _logits(hf, x)
    assert theirs.abs().max() > 1.0
    assert (_logits(ours, x) - theirs).abs().max().item() <= TOL


@pytest.mark.parametrize("name", ["deepseek_v3", "mixtral", "qwen2_moe"])
def test_import_fused_expert_layout_equals_per_expert(hf_saved, tmp_path, name):
    """transformers keeps routed experts fused in memory (`experts.gate_up_proj` (E, 2I, D), gate rows
    first; `experts.down_proj` (E, D, I)) and writes that layout with save_original_format=False.
    Importing it must give exactly the weights the per-expert hub layout gives."""
    from safetensors.torch import load_file

    hf, per_expert = hf_saved[name]
    fused = tmp_path / "fused"
    hf.save_pretrained(fused, save_original_format=False)
    f_sd, p_sd = load_file(str(fused / "model.safetensors")), load_file(str(per_expert / "model.safetensors"))
    assert not [k for k in f_sd if ".experts.0." in k]  # really the fused layout
    # the layout by hand, from the per-expert tensors of the same model
    block, (w_gate, w_up, w_down) = (
        ("block_sparse_moe", ("w1", "w3", "w2"))
        if name == "mixtral"
        else ("mlp", ("gate_proj", "up_proj", "down_proj"))
    )
    L = hf.config.num_hidden_layers - 1
    gate_up, down = (
        f_sd[f"model.layers.{L}.mlp.experts.gate_up_proj"],
        f_sd[f"model.layers.{L}.mlp.experts.down_proj"],
    )
    for j in range(gate_up.shape[0]):
        p = f"model.layers.{L}.{block}.experts.{j}."
        assert torch.equal(gate_up[j], torch.cat([p_sd[p + f"{w_gate}.weight"], p_sd[p + f"{w_up}.weight"]]))
        assert torch.equal(down[j], p_sd[p + f"{w_down}.weight"])

    import_hf(per_expert, tmp_path / "a", tokenizer="byte")
    import_hf(fused, tmp_path / "b", tokenizer="byte")
    a, b = load_run(tmp_path / "a")[0].state_dict(), load_run(tmp_path / "b")[0].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randint(0, 258, (2, 30), generator=torch.Generator().manual_seed(1))
    assert (_logits(load_run(tmp_path / "b")[0], x) - _logits(hf, x)).abs().max().item() <= TOL


def test_import_refuses_what_minimoe_cannot_express(hf_saved, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder = hf_saved["qwen2_moe"]
    bad = tmp_path / "learned_gate"
    bad.mkdir()
    (bad / "config.json").write_text((folder / "config.json").read_text())
    sd = load_file(str(folder / "model.safetensors"))
    sd["model.layers.1.mlp.shared_expert_gate.weight"] = torch.ones_like(
        sd["model.layers.1.mlp.shared_expert_gate.weight"]
    )
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(MinimoeError, match="shared_expert_gate"):
        import_hf(bad, tmp_path / "run", tokenizer="byte")
    sd["model.layers.1.mlp.shared_expert_gate.weight"].zero_()
    sd["model.layers.1.mlp.extra.weight"] = torch.ones(2)  # a weight the config does not describe
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(MinimoeError, match="weight model.layers.1.mlp.extra.weight, which has no place"):
        import_hf(bad, tmp_path / "run", tokenizer="byte")
    other = tmp_path / "jamba"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "jamba", "num_hidden_layers": 1}))
    save_file({"x": torch.zeros(1)}, str(other / "model.safetensors"))
    with pytest.raises(
        MinimoeError, match="model_type 'jamba' is not importable; minimoe imports deepseek_v3, "
    ):
        import_hf(other, tmp_path / "run", tokenizer="byte")
    (other / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1}))
    with pytest.raises(MinimoeError, match="llama is a dense model: `minimoe upcycle DIR"):
        import_hf(other, tmp_path / "run", tokenizer="byte")  # the command that does take it
    with pytest.raises(MinimoeError, match="no tokenizer.json"):
        import_hf(folder, tmp_path / "run")


@pytest.mark.parametrize(
    "name, dropped",
    [
        ("deepseek_v3", ["routed_scaling_factor", "norm_topk_prob"]),  # DeepseekV3Config: 2.5, true
        ("mixtral", ["rope_theta", "rope_parameters", "rms_norm_eps", "num_experts_per_tok"]),  # 1e6, 1e-5, 2
    ],
)
def test_import_reads_keys_missing_from_config_json_as_transformers_does(hf_saved, tmp_path, name, dropped):
    from safetensors.torch import load_file, save_file

    _, folder = hf_saved[name]
    lean = tmp_path / "lean"
    lean.mkdir()
    c = json.loads((folder / "config.json").read_text())
    (lean / "config.json").write_text(json.dumps({k: v for k, v in c.items() if k not in dropped}))
    save_file(load_file(str(folder / "model.safetensors")), str(lean / "model.safetensors"))
    theirs = AutoModelForCausalLM.from_pretrained(str(lean), dtype=torch.float32).eval()
    import_hf(lean, tmp_path / "run", tokenizer="byte")
    x = torch.randint(0, 258, (2, 30), generator=torch.Generator().manual_seed(1))
    assert (_logits(load_run(tmp_path / "run")[0], x) - _logits(theirs, x)).abs().max().item() <= TOL


# ------------------------------------------------------------------ CLI


def test_cli_export_import_generate(tmp_path, tok, capsys):
    m = _model(**CASES["deepseek_v3"])
    write_run(tmp_path / "run", m, tok, {"source": "test"})
    assert (
        main(
            [
                "export",
                str(tmp_path / "run"),
                "--out",
                str(tmp_path / "hf"),
                "--shard-size",
                "50KB",
                "--verify",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "exported deepseek_v3" in out and "model.safetensors.index.json" in out
    diff = float(out.split("against transformers (model):")[1].split()[0])
    assert diff <= TOL
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    assert (
        main(
            [
                "generate",
                str(tmp_path / "back"),
                "--prompt",
                "ab",
                "--max-new-tokens",
                "4",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    assert main(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "hf")]) == 2  # exists: untouched
    assert "already exists" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "run"), "--out", str(tmp_path / "y")]) == 2  # not an HF folder


# ------------------------------------------------------------------ upcycling


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    m = _scaled(LlamaForCausalLM(cfg))
    d = tmp_path_factory.mktemp("llama")
    m.save_pretrained(d)
    return m, d


@pytest.mark.parametrize(
    "kw, exact",
    [
        (dict(experts=1, top_k=1), True),  # a single expert: the dense MLP
        (dict(experts=4, top_k=2), True),  # identical copies, renormalised weights summing to 1
        (dict(experts=4, top_k=4, granularity=4, router_std=0.0), True),  # all slices, each weight 1
        (dict(experts=8, top_k=2, granularity=4, dense_layers=1, scoring="sigmoid"), False),
    ],
)
def test_upcycled_llama_reproduces_dense_logits(llama_dir, tmp_path, kw, exact):
    dense, d = llama_dir
    upcycle(d, tmp_path / "run", tokenizer="byte", **kw)
    moe, _, cfg, _ = load_run(tmp_path / "run")
    assert cfg.model.attn_type == "gqa" and cfg.model.n_routed_experts == kw["experts"]
    x = torch.randint(0, 258, (2, 30), generator=torch.Generator().manual_seed(2))
    diff = (_logits(moe, x) - _logits(dense, x)).abs().max().item()
    assert diff <= TOL if exact else diff > 0.1


def test_upcycle_config_takes_the_dense_checkpoints_fields(llama_dir):
    """Context length, norm epsilon and KV heads come from config.json (a missing
    num_key_value_heads means one KV head per query head); --dense-layers keeps leading layers dense;
    no shared expert is made up; --experts must be a multiple of --granularity."""
    c = json.loads((llama_dir[1] / "config.json").read_text())
    rope = {"rope_type": "default", "rope_theta": 5e5}
    c = {**c, "rms_norm_eps": 1e-5, "rope_parameters": rope, "head_dim": 16, "tie_word_embeddings": True}
    cfg = upcycle_config(c, 4, 2, 2, 1, "softmax", [])
    assert (cfg.max_position_embeddings, cfg.rms_norm_eps, cfg.num_key_value_heads) == (64, 1e-5, 2)
    assert (cfg.rope_theta, cfg.head_dim, cfg.tie_word_embeddings) == (5e5, 16, True)
    assert (cfg.first_k_dense_replace, cfg.n_shared_experts, cfg.moe_intermediate_size) == (1, 0, 32)
    c.pop("num_key_value_heads")
    assert upcycle_config(c, 4, 2, 2, 1, "softmax", []).num_key_value_heads == 4
    with pytest.raises(MinimoeError, match="multiple of --granularity"):
        upcycle_config(c, 6, 2, 4, 0, "softmax", [])


def test_upcycle_copies_dense_layers_and_seeds_a_fresh_router(llama_dir):
    """A layer kept dense gets the dense MLP as it is (gate is gate, up is up); an MoE layer's
    balancing bias starts at zero and its router comes from --seed alone."""
    dense = load_tensors(llama_dir[1])
    c = json.loads((llama_dir[1] / "config.json").read_text())
    cfg = upcycle_config(c, 4, 2, 2, 1, "sigmoid", [])
    sd = upcycle_state_dict(dense, cfg, 2, 0.02, seed=0)
    for p in ("gate_proj", "up_proj", "down_proj"):
        assert torch.equal(sd[f"layers.0.mlp.{p}.weight"], dense[f"model.layers.0.mlp.{p}.weight"].float())
    assert cfg.aux_free_bias and torch.equal(sd["layers.1.mlp.gate.e_score_correction_bias"], torch.zeros(4))
    router = "layers.1.mlp.gate.weight"
    assert torch.equal(upcycle_state_dict(dense, cfg, 2, 0.02, seed=0)[router], sd[router])
    assert not torch.equal(upcycle_state_dict(dense, cfg, 2, 0.02, seed=1)[router], sd[router])


def test_cli_upcycle_and_errors(llama_dir, tmp_path, capsys):
    _, d = llama_dir
    argv = ["upcycle", str(d), "--experts", "4", "--top-k", "2", "--granularity", "2", "--tokenizer", "byte"]
    assert main([*argv, "--out", str(tmp_path / "run"), "model.aux_free_bias=false"]) == 0
    _, _, cfg, meta = load_run(tmp_path / "run")
    assert cfg.model.moe_intermediate_size == 32 and not cfg.model.aux_free_bias
    assert meta["upcycled"]["granularity"] == 2
    assert (
        main(
            [
                "upcycle",
                str(d),
                "--experts",
                "4",
                "--top-k",
                "2",
                "--granularity",
                "3",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 2
    )
    assert "does not divide intermediate_size" in capsys.readouterr().err
    assert main([*argv, "--out", str(tmp_path / "y"), "model.hidden_size=64"]) == 2


def _edited_llama(llama_dir, folder, **changes):
    """A copy of the dense checkpoint whose config.json has `changes`."""
    shutil.copytree(llama_dir[1], folder)
    c = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**c, **changes}))
    return folder


def test_cli_upcycle_refuses_weights_the_config_does_not_describe(llama_dir, tmp_path, capsys):
    bad = _edited_llama(llama_dir, tmp_path / "bad", intermediate_size=48)
    argv = ["upcycle", str(bad), "--experts", "4", "--top-k", "2", "--tokenizer", "byte"]
    assert main([*argv, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "weight model.layers.0.mlp.gate_proj.weight has shape (64, 32), the config implies (48, 32)" in err
    assert not (tmp_path / "run").exists()


def test_upcycle_refuses_yarn_without_truncation(llama_dir, tmp_path):
    """transformers' YaRN with truncate=false leaves the ramp's ends unrounded: other frequencies."""
    yarn = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "truncate": False}
    bad = _edited_llama(llama_dir, tmp_path / "bad", rope_scaling=yarn)
    with pytest.raises(MinimoeError, match="YaRN with truncate=false"):
        upcycle(bad, tmp_path / "run", experts=1, top_k=1, tokenizer="byte")


@pytest.mark.parametrize(
    "changes",
    [
        dict(model_type="mistral", sliding_window=32),
        dict(model_type="qwen2", sliding_window=32, use_sliding_window=True),
    ],
)  # Mistral's window is on unless use_sliding_window says otherwise, Qwen2's off unless it says so
def test_upcycle_refuses_sliding_windows(llama_dir, tmp_path, changes):
    bad = _edited_llama(llama_dir, tmp_path / "bad", **changes)
    with pytest.raises(MinimoeError, match="sliding-window attention"):
        upcycle(bad, tmp_path / "run", experts=1, top_k=1, tokenizer="byte")


def test_upcycle_refuses_nonzero_attention_biases(llama_dir, tmp_path):
    """Qwen2-style q/k/v biases have no place in minimoe's attention: zero ones are dropped, others refused."""
    from safetensors.torch import load_file, save_file

    biased = _edited_llama(llama_dir, tmp_path / "biased")
    sd = load_file(str(biased / "model.safetensors"))
    sd["model.layers.0.self_attn.k_proj.bias"] = torch.zeros(16)
    save_file(sd, str(biased / "model.safetensors"))
    upcycle(biased, tmp_path / "ok", experts=1, top_k=1, tokenizer="byte")
    sd["model.layers.1.self_attn.q_proj.bias"] = torch.full((32,), 0.1)
    save_file(sd, str(biased / "model.safetensors"))
    with pytest.raises(MinimoeError, match=r"attention biases \(q_proj.bias\)"):
        upcycle(biased, tmp_path / "run", experts=1, top_k=1, tokenizer="byte")


@pytest.mark.parametrize(
    "case, targets, match",
    [("mixtral", ["attention", "experts"], "not mixtral"), ("deepseek_v3", ["mlp"], "PEFT cannot load")],
)
def test_cli_export_refuses_an_adapter_before_writing_the_model(tmp_path, tok, capsys, case, targets, match):
    """An adapter `export_adapter` cannot rewrite (for a format that re-parameterises the experts, or
    with the `mlp` targets that `minimoe lora`'s defaults include) is refused in one sentence before
    --out is written, which a second try would otherwise need --force to replace."""
    from minimoe.finetune.lora import apply_lora, save_adapter

    model = _model(**CASES[case])
    write_run(tmp_path / "run", model, tok, {"source": "test"})
    save_adapter(apply_lora(copy.deepcopy(model), r=2, alpha=6, targets=targets), tmp_path / "adapter")
    argv = _export_adapter_argv(tmp_path)
    assert main(argv) == 2
    assert match in capsys.readouterr().err and not (tmp_path / "hf").exists()
