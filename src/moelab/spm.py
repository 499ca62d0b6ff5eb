"""SentencePiece tokenizers as ``tokenizers`` backends, checked to encode exactly as sentencepiece does.

The paper's tokenizer is Llama-2-style sentencepiece (docs/paper.md §Setup). A directory holding only a
``tokenizer.model`` is converted here once, and the result is compared with ``sentencepiece`` itself on probe texts
(spaces, digits, newlines, accents, characters outside the vocabulary); any difference is a one-line DataError, so a
converted tokenizer is never silently different. Everything downstream (data shards, the checkpoint's
``tokenizer.json``, evaluation, task loss, GRPO) then uses the converted backend.

Supported: BPE and unigram models, byte fallback, any precompiled normalization rule (identity, nmt_nfkc, …),
``add_dummy_prefix`` and ``remove_extra_whitespaces``. As in moelab's own BPE, nothing is added on encode (no BOS);
control symbols (``<s>``, ``</s>``) become special tokens of the backend. Torch-free.
"""

from __future__ import annotations

from pathlib import Path

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers

from .errors import DataError

__all__ = ["PROBE_TEXTS", "check_matches_sentencepiece", "sentencepiece_backend"]

# Texts on which a conversion must agree with sentencepiece, token for token (leading/trailing/repeated spaces,
# digits, tabs and newlines, accents and compatibility characters, CJK and symbols that need byte fallback).
PROBE_TEXTS = (
    "",
    "Question: Natalia sold 48 clips in April.\nAnswer: 48 / 2 = 24\n#### 72",
    " leading space",
    "  two leading spaces and trailing  ",
    "tabs\tand\n\nblank lines\n",
    "décès naïve Ünïcode façade",
    "ﬁne ｆｕｌｌｗｉｄｔｈ ① ²",
    "日本語のテキスト ✓ → ∑ 😀",
    "x = 3.14159, y = -2e10; f(x) = \\frac{1}{2}",
    "   \n   ",
)

_UNIGRAM, _BPE = 1, 2  # sentencepiece TrainerSpec.model_type
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6  # ModelProto.SentencePiece.type


def _read_proto(model_file: Path):
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(model_file.read_bytes())
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError is the only detail we have
        raise DataError(f"{model_file}: not a sentencepiece model ({type(e).__name__})") from None
    if not proto.pieces:
        raise DataError(f"{model_file}: not a sentencepiece model (no pieces)")
    return proto


def _model(proto, model_file: Path) -> models.Model:
    pieces = [(p.piece, p.score) for p in proto.pieces]
    ts = proto.trainer_spec
    if ts.model_type == _UNIGRAM:
        return models.Unigram(pieces, unk_id=ts.unk_id, byte_fallback=ts.byte_fallback)
    if ts.model_type == _BPE:
        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        return models.BPE(vocab, _bpe_merges(proto), unk_token=ts.unk_piece, fuse_unk=True,
                          byte_fallback=ts.byte_fallback)
    raise DataError(f"{model_file}: sentencepiece model_type {ts.model_type} is not supported (BPE or unigram)")


def _bpe_merges(proto) -> list[tuple[str, str]]:
    """sentencepiece BPE joins the adjacent pair whose joined piece scores highest; its pieces are stored best first,
    so a merge's rank is the id of the piece it makes. Every split of a normal piece into two normal pieces is a
    merge; splits of one piece are ordered by the ids of their parts."""
    ids = {p.piece: i for i, p in enumerate(proto.pieces) if p.type in (_NORMAL, _USER_DEFINED)}
    merges = []
    for piece, i in sorted(ids.items(), key=lambda kv: kv[1]):
        splits = [(piece[:j], piece[j:]) for j in range(1, len(piece)) if piece[:j] in ids and piece[j:] in ids]
        merges += sorted(splits, key=lambda lr: (ids[lr[0]], ids[lr[1]]))
    return merges


def _normalizer(spec) -> normalizers.Normalizer:
    """sentencepiece's order: character normalization, whitespace cleanup, dummy prefix, spaces → ▁."""
    steps: list[normalizers.Normalizer] = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex("^ | $"), "")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    steps.append(normalizers.Replace(" ", "▁"))
    return normalizers.Sequence(steps)


def sentencepiece_backend(model_file: str | Path) -> tokenizers.Tokenizer:
    """A ``tokenizers.Tokenizer`` equivalent to the sentencepiece model in ``model_file`` (checked on
    :data:`PROBE_TEXTS`; a difference raises DataError)."""
    model_file = Path(model_file)
    proto = _read_proto(model_file)
    backend = tokenizers.Tokenizer(_model(proto, model_file))
    backend.normalizer = _normalizer(proto.normalizer_spec)
    ts = proto.trainer_spec
    steps = [decoders.Replace(ts.unk_piece, ts.unk_surface), decoders.Replace("▁", " ")]
    if ts.byte_fallback:
        steps.append(decoders.ByteFallback())
    steps.append(decoders.Fuse())  # one string, so Strip removes only the dummy prefix's space
    if proto.normalizer_spec.add_dummy_prefix:
        steps.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(steps)
    backend.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                                for p in proto.pieces if p.type in (_CONTROL, _UNKNOWN)])
    user = [AddedToken(p.piece, special=False, normalized=False) for p in proto.pieces if p.type == _USER_DEFINED]
    if user:
        backend.add_tokens(user)
    check_matches_sentencepiece(backend, model_file)
    return backend


def check_matches_sentencepiece(backend: tokenizers.Tokenizer, model_file: Path, texts=PROBE_TEXTS) -> None:
    """Encode and decode ``texts`` with both; the first difference is a DataError naming the text."""
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_proto=model_file.read_bytes())
    for text in texts:
        want, got = sp.encode(text), backend.encode(text, add_special_tokens=False).ids
        if want != got:
            raise DataError(f"{model_file}: cannot convert exactly: sentencepiece encodes {text!r} as {want[:8]}…, "
                            f"the conversion as {got[:8]}…")
        if sp.decode(want) != backend.decode(got, skip_special_tokens=False):
            raise DataError(f"{model_file}: cannot convert exactly: decoding {text!r} differs")
