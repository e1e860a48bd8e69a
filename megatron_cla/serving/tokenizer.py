"""The launcher's SentencePiece tokenizer as Hugging Face tokenizer files.

The files (``tokenizer_config.json`` names ``PreTrainedTokenizerFast``) must encode and decode
exactly as the SentencePiece model the run was trained with, with no remote code:
``PreTrainedTokenizerFast.from_pretrained(DIR)`` loads them as they are. (``AutoTokenizer`` reads
the model's ``config.json`` first, whose ``auto_map`` names the model's code, so transformers asks
for ``trust_remote_code=True`` there as it does for the model.) The tokenizers-library equivalent
of a lossless SentencePiece BPE model (:func:`megatron_cla.data.tokenizer.train_sentencepiece`:
identity normalisation, no dummy prefix, whitespace kept, byte fallback) is

* normaliser: space -> ``▁`` (nothing else: the SentencePiece model normalises nothing else);
* no pre-tokeniser (SentencePiece's BPE encoder does not split either; its training did, so no
  piece crosses a word, script or digit boundary);
* BPE over the same pieces, merges ranked by the merged piece's score (SentencePiece merges the
  best-scoring piece first), byte fallback for characters without a piece;
* decoder: ``▁`` -> space, byte pieces -> UTF-8, then concatenation;
* the control pieces (pad, unk, bos, eos) are special tokens that text never produces
  (``split_special_tokens``), as in SentencePiece, and no token is added around the text.

Any other kind of SentencePiece model is refused, and every export checks the result against
SentencePiece on a set of probe strings (:func:`check_same_encoding`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

__all__ = [
    "PROBES",
    "check_auto_tokenizer",
    "check_same_encoding",
    "hf_tokenizer_size",
    "write_hf_tokenizer",
    "write_run_tokenizer",
]

_SPACE = "\u2581"
PROBES = [
    "It is a truth universally acknowledged, that a single man in possession",
    "  two  spaces,\ttabs\tand\nnew\n\nlines  ",
    "Digits 1234567890 and 3.14159, dates 2026-12-02; prices $9.99.",
    "Unicode: naïve café, Ærøskøbing, ß, Ωμέγα, Привет, 日本語, emoji 🙂🚀.",
    "Specials as text: <s> </s> <pad> <unk> <0x41>",
    "",
    " ",
    "▁ literal lower-one-eighth block",
]


def _spm(model_path: Path) -> Any:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(model_path))


def _check_kind(model_path: Path) -> None:
    """Refuse SentencePiece models whose behaviour the tokenizer.json below does not have."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    found = {
        "model_type": pb.TrainerSpec.ModelType.Name(spec.model_type),
        "normalization": norm.name,
        "add_dummy_prefix": norm.add_dummy_prefix,
        "remove_extra_whitespaces": norm.remove_extra_whitespaces,
        "escape_whitespaces": norm.escape_whitespaces,
        "byte_fallback": spec.byte_fallback,
        "treat_whitespace_as_suffix": spec.treat_whitespace_as_suffix,
    }
    wanted = {
        "model_type": "BPE",
        "normalization": "identity",
        "add_dummy_prefix": False,
        "remove_extra_whitespaces": False,
        "escape_whitespaces": True,
        "byte_fallback": True,
        "treat_whitespace_as_suffix": False,
    }
    differing = {k: v for k, v in found.items() if wanted[k] != v}
    if differing:
        raise ValueError(
            f"{model_path} is not a lossless SentencePiece BPE model as megatron_cla trains "
            f"them ({differing}, expected { ({k: wanted[k] for k in differing}) }); its exact "
            f"Hugging Face equivalent cannot be written"
        )


def _vocab_and_merges(sp: Any) -> tuple[dict[str, int], list[tuple[str, str]], list[int]]:
    """Pieces, BPE merges (best-scoring merged piece first) and the special (control) ids."""
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    special = [i for i in range(sp.get_piece_size()) if sp.is_control(i) or sp.is_unknown(i)]
    mergeable = {
        sp.id_to_piece(i): i
        for i in range(sp.get_piece_size())
        if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))
    }
    ranked = []
    for piece, piece_id in mergeable.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                score = sp.get_score(piece_id)
                ranked.append((-score, piece_id, mergeable[left], mergeable[right], left, right))
    ranked.sort()
    return vocab, [(r[4], r[5]) for r in ranked], special


def _tokenizer_json(model_path: Path) -> str:
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers

    sp = _spm(model_path)
    vocab, merges, special = _vocab_and_merges(sp)
    unk = sp.id_to_piece(sp.unk_id())
    tokenizer = Tokenizer(
        models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True)
    )
    tokenizer.normalizer = normalizers.Replace(" ", _SPACE)
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tokenizer.add_special_tokens(
        [AddedToken(sp.id_to_piece(i), special=True, normalized=False) for i in special]
    )
    tokenizer.encode_special_tokens = True
    return tokenizer.to_str(pretty=True)


def _special_tokens(sp: Any) -> dict[str, str]:
    names = {"bos_token": sp.bos_id(), "eos_token": sp.eos_id(), "unk_token": sp.unk_id()}
    names["pad_token"] = sp.pad_id()
    return {name: sp.id_to_piece(i) for name, i in names.items() if i >= 0}


def write_hf_tokenizer(model_path: Path, out: Path, max_length: int) -> dict[str, int]:
    """Write ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json`` and the
    SentencePiece ``tokenizer.model`` itself into ``out``; returns the special ids
    (``bos_token_id``, ``eos_token_id``, ``pad_token_id``) for the model config."""
    _check_kind(model_path)
    sp = _spm(model_path)
    (out / "tokenizer.json").write_text(_tokenizer_json(model_path), encoding="utf-8")
    specials = _special_tokens(sp)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": max_length,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,
        "padding_side": "left",
        **specials,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2, sort_keys=True))
    (out / "tokenizer.model").write_bytes(model_path.read_bytes())
    ids = {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id()}
    return {k: v for k, v in ids.items() if v >= 0}


def check_same_encoding(model_path: Path, hf_dir: Path, texts: list[str]) -> None:
    """Raise ``ValueError`` if the tokenizer files in ``hf_dir``, loaded as users load them
    without remote code (``PreTrainedTokenizerFast.from_pretrained``), encode or decode any of
    ``texts`` differently from the SentencePiece model."""
    from transformers import PreTrainedTokenizerFast

    sp = _spm(model_path)
    hf = PreTrainedTokenizerFast.from_pretrained(str(hf_dir))
    for text in texts:
        ids = sp.encode(text)
        got = hf.encode(text, add_special_tokens=False, verbose=False)  # texts may be long
        decoded = hf.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if got != ids or decoded != sp.decode(ids):
            raise ValueError(
                f"the Hugging Face tokenizer differs from {model_path} on {text[:60]!r}: "
                f"ids {got[:12]} vs {ids[:12]}, text {decoded[:40]!r} vs {sp.decode(ids)[:40]!r}"
            )


def hf_tokenizer_size(tokenizer: Path) -> int:
    """Ids the run's tokenizer produces: a SentencePiece model's pieces, or the length of a
    Hugging Face tokenizer (added tokens included)."""
    from megatron_cla.data.tokenizer import is_hf_tokenizer

    if is_hf_tokenizer(tokenizer):
        from transformers import AutoTokenizer

        return len(AutoTokenizer.from_pretrained(str(tokenizer)))
    return _spm(tokenizer).get_piece_size()


def write_run_tokenizer(tokenizer: Path, out: Path, max_length: int) -> dict[str, int]:
    """The run's tokenizer into the export ``out``: a Hugging Face tokenizer's files as they are
    (the model's own tokenizer, imported with it), a SentencePiece model converted and checked
    (:func:`write_hf_tokenizer`). Returns the special ids for the model config."""
    from megatron_cla.data.tokenizer import is_hf_tokenizer, tokenizer_files

    if not is_hf_tokenizer(tokenizer):
        special = write_hf_tokenizer(tokenizer, out, max_length)
        check_same_encoding(tokenizer, out, PROBES)
        return special
    from transformers import AutoTokenizer

    for file in tokenizer_files(tokenizer):
        shutil.copyfile(file, out / file.name)
    hf = AutoTokenizer.from_pretrained(str(tokenizer))
    ids = {"bos_token_id": hf.bos_token_id, "eos_token_id": hf.eos_token_id}
    ids["pad_token_id"] = hf.pad_token_id
    return {k: v for k, v in ids.items() if v is not None}


def _encoder(tokenizer: Path) -> Any:
    """``text -> ids`` of the run's tokenizer, no special tokens added."""
    from megatron_cla.data.tokenizer import is_hf_tokenizer

    if not is_hf_tokenizer(tokenizer):
        return _spm(tokenizer).encode
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(str(tokenizer))
    return lambda text: hf.encode(text, add_special_tokens=False, verbose=False)


def check_auto_tokenizer(tokenizer: Path, model_dir: Path) -> None:
    """Raise ``ValueError`` unless ``AutoTokenizer.from_pretrained(model_dir)`` - which picks its
    class from the model's ``model_type`` as well as from ``tokenizer_config.json`` - encodes
    :data:`PROBES` as the run's ``tokenizer`` does."""
    from transformers import AutoTokenizer

    loaded = AutoTokenizer.from_pretrained(str(model_dir))
    want = _encoder(tokenizer)
    for text in PROBES:
        got = loaded.encode(text, add_special_tokens=False, verbose=False)
        if got != want(text):
            model_type = json.loads((model_dir / "config.json").read_text()).get("model_type")
            raise ValueError(
                f"AutoTokenizer loads this {model_type} model's tokenizer as "
                f"{type(loaded).__name__}, which encodes {text[:40]!r} as {got[:8]}, the run's "
                f"tokenizer {tokenizer} as {want(text)[:8]}; give the run a tokenizer of that "
                f"class, or unset model.hf_architecture to export MegatronCLAForCausalLM"
            )
