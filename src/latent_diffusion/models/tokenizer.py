"""CLIP's byte-level BPE tokenizer, offline: the vocabulary ships in `assets/` (see its LICENSE file).

Text -> ftfy fix, HTML unescape, whitespace collapse, lower case -> words by CLIP's regex -> UTF-8 bytes
mapped to printable characters -> BPE merges by rank -> ids. A prompt becomes
[<|startoftext|>, up to 75 ids, <|endoftext|>, padding] (77 ids); longer prompts are cut and keep the end token.
"""

import functools
import gzip
import html
import itertools
from importlib import resources

import ftfy
import regex

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
WORD = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE,
)


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
    """A reversible map from the 256 byte values to printable characters (BPE avoids whitespace/control)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars)}


class CLIPTokenizer:
    def __init__(self, max_length: int = 77):
        self.max_length = max_length
        vocab_file = resources.files("latent_diffusion") / "assets" / "bpe_simple_vocab_16e6.txt.gz"
        lines = gzip.decompress(vocab_file.read_bytes()).decode("utf-8").split("\n")
        merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]  # 48894 merges
        byte_chars = list(bytes_to_unicode().values())
        vocab = byte_chars + [c + "</w>" for c in byte_chars] + ["".join(m) for m in merges] + [SOT, EOT]
        self.encoder = {token: i for i, token in enumerate(vocab)}  # 49408 tokens
        self.bpe_ranks = {merge: i for i, merge in enumerate(merges)}
        self.sot_id, self.eot_id = self.encoder[SOT], self.encoder[EOT]
        self.bpe = functools.lru_cache(maxsize=65536)(self._bpe)

    def _bpe(self, word: str) -> tuple[str, ...]:
        """Merge the lowest-ranked adjacent pair until none is in the merge table; '</w>' marks the word end."""
        parts = (*word[:-1], word[-1] + "</w>")
        while len(parts) > 1:
            pairs = set(itertools.pairwise(parts))
            best = min(pairs, key=lambda p: self.bpe_ranks.get(p, float("inf")))
            if best not in self.bpe_ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i < len(parts) - 1 and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = tuple(merged)
        return parts

    def encode(self, text: str) -> list[int]:
        """Token ids of a text, without start/end tokens or truncation."""
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        text = regex.sub(r"\s+", " ", text).strip().lower()
        byte_map = bytes_to_unicode()
        ids = []
        for word in WORD.findall(text):
            if word in (SOT, EOT):  # special tokens typed in the prompt map to themselves, as in CLIP
                ids.append(self.encoder[word])
                continue
            ids.extend(self.encoder[t] for t in self.bpe("".join(byte_map[b] for b in word.encode("utf-8"))))
        return ids

    def decode(self, ids: list[int]) -> str:
        """Ids -> text (lower case, normalised whitespace): for messages such as what a cut removed."""
        if not hasattr(self, "decoder"):
            self.decoder = {i: token for token, i in self.encoder.items()}
            self.byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        out = bytearray()
        for i in ids:
            if i not in (self.sot_id, self.eot_id):
                token = self.decoder[i]
                out += bytes(self.byte_decoder[c] for c in token.removesuffix("</w>"))
                out += b" " if token.endswith("</w>") else b""
        return out.decode("utf-8", "replace").strip()

    def cut_text(self, prompt: str) -> str:
        """What truncation to max_length drops from a prompt ("" if it fits)."""
        return self.decode(self.encode(prompt)[self.max_length - 2 :])

    def __call__(self, prompts: list[str], pad_token: int) -> tuple[list[list[int]], list[bool]]:
        """Prompts -> (rows of max_length ids, whether each prompt was cut to fit)."""
        rows, cut = [], []
        for prompt in prompts:
            ids = self.encode(prompt)
            keep = self.max_length - 2
            cut.append(len(ids) > keep)
            ids = [self.sot_id, *ids[:keep], self.eot_id]
            rows.append(ids + [pad_token] * (self.max_length - len(ids)))
        return rows, cut


@functools.cache
def clip_tokenizer(max_length: int = 77) -> CLIPTokenizer:
    """Build once per process: reading the vocabulary takes ~0.3 s."""
    return CLIPTokenizer(max_length)
