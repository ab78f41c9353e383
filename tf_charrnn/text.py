"""Bytes to text, and Hangul syllables to jamo and back.

This module owns two steps between a corpus file and the vocabulary:

* Decoding. `read_text` / `decode_bytes` turn a file's bytes into a str without ever dropping or
  replacing a byte: a forced encoding is used strictly; otherwise a byte-order mark decides, else
  NUL bytes mean binary, else strict UTF-8, else the charset detector (Korean legacy files are
  read as CP949, the superset of EUC-KR), and every guess is verified by a strict decode. Line
  endings are kept exactly.
* Hangul. A precomposed syllable (U+AC00..U+D7A3, 11,172 of them) is one character to a char-RNN,
  so a Korean corpus has a vocabulary of a couple of thousand rare symbols. `decompose_hangul`
  splits each syllable into its two or three conjoining jamo (initial L, medial V, optional final
  T; a few dozen symbols in all) and `compose_hangul` puts sampled jamo back together.
  `compose_hangul(decompose_hangul(t)) == t` for every str t: characters that were already
  conjoining jamo (U+1100..U+11FF), and the escape mark itself, are prefixed with the escape mark
  HANGUL_ESCAPE on the way in, so compose can tell them from jamo that decompose produced.
"""

import codecs
import re
import unicodedata
from pathlib import Path

import numpy as np
from charset_normalizer import from_bytes

from tf_charrnn.config import is_text_codec
from tf_charrnn.errors import CharRNNError, UsageError

# Byte-order marks, longest first: the UTF-32-LE mark starts with the UTF-16-LE one.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)

# Encodings the detector may name for Korean text; CP949 decodes all of EUC-KR and more.
_KOREAN_ENCODINGS = frozenset({"euc_kr", "cp949", "uhc", "johab"})

# KS X 1001 "Hangul filler": an EUC-KR file spells syllables outside KS X 1001 (e.g. 똠) as the
# filler plus three jamo. Python's euc_kr codec reads those back as one syllable; cp949 does not.
_EUC_KR_FILLER = b"\xa4\xd4"

# When the detector's best guesses name several codecs that give the same text, report the
# commonest one, so that a Western file is cp1252 rather than, say, cp1257.
_PREFERRED_EQUIVALENTS = ("cp1252", "iso8859_1", "cp949", "cp932", "gb18030", "big5")

_ENCODING_HINT = "e.g. --encoding utf-8, cp949, shift_jis or latin-1"

HANGUL_ESCAPE = "\ue000"

_S_BASE, _S_COUNT = 0xAC00, 11172
_L_BASE, _V_BASE, _T_BASE = 0x1100, 0x1161, 0x11A7  # _T_BASE + 0 means "no final"
_V_COUNT, _T_COUNT = 21, 28
_N_COUNT = _V_COUNT * _T_COUNT  # syllables per initial: 588
_JAMO_FIRST, _JAMO_LAST = 0x1100, 0x11FF
_ESCAPE_CODE = ord(HANGUL_ESCAPE)

_SYLLABLE_RE = re.compile("[\uac00-\ud7a3]")
# An escape pair, or an unescaped L V [T] run that decompose_hangul produced.
_COMPOSE_RE = re.compile(
    f"{HANGUL_ESCAPE}(.)|([\u1100-\u1112])([\u1161-\u1175])([\u11a8-\u11c2])?", re.DOTALL
)


def _codec_name(encoding):
    """The codec's canonical name; LookupError for a name that is not a text encoding (Python's
    base64, hex and rot13 codecs are bytes-to-bytes or str-to-str and cannot decode a file)."""
    if not is_text_codec(encoding):
        raise LookupError(encoding)
    return codecs.lookup(encoding).name


def _strict_decode(raw, encoding, name):
    """Decode with one codec, no replacement; any failure is a one-line CharRNNError."""
    try:
        codec = _codec_name(encoding)
    except LookupError:
        raise UsageError(
            f"unknown encoding {encoding!r} for {name}: "
            f"give a codec Python knows ({_ENCODING_HINT})"
        ) from None
    try:
        return raw.decode(codec), codec
    except UnicodeDecodeError as error:
        raise CharRNNError(
            f"cannot decode {name} as {codec}: {error.reason} at byte offset {error.start}; "
            f"try a different --encoding ({_ENCODING_HINT})"
        ) from None
    except UnicodeError as error:  # Python's 'undefined' codec refuses every input
        raise UsageError(f"cannot decode {name} as {codec} ({error}): give a text encoding "
                         f"({_ENCODING_HINT})") from None


def _byte_readings(codec, byte_values):
    """What each byte reads as in codec alone, as a str; None unless every one reads as one
    character (a multi-byte codec's lead bytes do not)."""
    try:
        chars = [bytes([value]).decode(codec) for value in byte_values]
    except (UnicodeDecodeError, LookupError):
        return None
    return "".join(chars) if all(len(char) == 1 for char in chars) else None


# The accented letters of languages written in the single-byte Latin code pages (cp1250, cp1252,
# cp1257, ISO 8859): of two readings of a file, the one whose letters belong to one language's
# alphabet is the right one (French read as cp1250 gives à è ï as ŕ č ď: no language has them all).
_LATIN_ALPHABETS = (
    "àâæçéèêëîïôœùûüÿ",  # French
    "äöüß",  # German
    "áéíñóúü",  # Spanish
    "àáâãçéêíóôõú",  # Portuguese
    "àèéìíîòóùú",  # Italian
    "àçèéíïòóúü",  # Catalan
    "áéèëïóöü",  # Dutch
    "åäöé",  # Swedish, Finnish
    "æøåé",  # Danish, Norwegian
    "áðéíóúýþæö",  # Icelandic
    "ąćęłńóśźż",  # Polish
    "áčďéěíňóřšťúůýž",  # Czech
    "áäčďéíĺľňóôŕšťúýž",  # Slovak
    "áéíóöőúüű",  # Hungarian
    "čćđšž",  # Croatian, Bosnian, Slovenian
    "ăâîșțşţ",  # Romanian
    "ąčęėįšųūž",  # Lithuanian
    "āčēģīķļņšūž",  # Latvian
    "äõöüšž",  # Estonian
    "çğıöşü",  # Turkish
)
# Weighed even when the detector omits them; on a tie, the first of them wins.
_LATIN_CODE_PAGES = ("cp1252", "cp1250", "cp1257")
# Typographic marks the Latin code pages hold beside letters (quotes, dashes, ¡ ¿, ordinals).
_LATIN_MARKS = "\u00a0“”‘’‚„–—…«»‹›¡¿€£¥¢©®™°·•§¶†‡±×÷¹²³ªº"


def _is_latin(reading):
    return all(unicodedata.name(char, "").startswith("LATIN") for char in reading
               if char.isalpha() and char not in _LATIN_MARKS)


def _plausible_share(reading, counts):
    """The largest share of the file's non-ASCII bytes that read as one language's letters or
    as common typographic marks."""
    return max(sum(count for char, count in zip(reading, counts)
                   if char.lower() in alphabet or char in _LATIN_MARKS)
               for alphabet in _LATIN_ALPHABETS) / sum(counts)


def _ambiguity(name, readings, codecs_):
    """The one-line error for two codecs that read the file's letters differently."""
    (first, first_text), (second, second_text) = zip(codecs_, readings)
    differ = [i for i, (a, b) in enumerate(zip(first_text, second_text)) if a != b][:5]
    return CharRNNError(
        f"{name} reads as {' '.join(first_text[i] for i in differ)} in {first} and as "
        f"{' '.join(second_text[i] for i in differ)} in {second}, and the detector cannot tell "
        f"which: pass the --encoding that gives the text's letters ({first}, {second}, or "
        f"another, e.g. latin-1)"
    )


def _preferred(codecs_):
    """codecs_ (equivalent for this file) with the commonest names first."""
    return sorted(codecs_, key=lambda codec: (_PREFERRED_EQUIVALENTS.index(codec)
                                              if codec in _PREFERRED_EQUIVALENTS else 99))


def _latin_reading(name, matches, best, best_reading, present, counts):
    """For a file the detector reads as Latin letters: the codecs giving the reading whose
    accented letters fit one language best, commonest name first; None where that does not apply
    (no accented letter, a reading not in Latin script, a multi-byte codec). Readings that fit
    equally well but give other letters are an error naming two of them."""
    if best_reading is None or not _is_latin(best_reading):
        return None
    readings = {}
    for codec in dict.fromkeys([best.encoding, *(m.encoding for m in matches),
                                *_LATIN_CODE_PAGES]):
        reading = _byte_readings(codec, present)
        if reading is not None and _is_latin(reading):
            readings.setdefault(reading, []).append(codec)
    shares = {reading: _plausible_share(reading, counts) for reading in readings}
    top = max(shares.values())
    if top == 0:
        return None

    def rank(reading):  # the code pages first, then the detector's order (best first)
        return min((_LATIN_CODE_PAGES.index(codec) for codec in readings[reading]
                    if codec in _LATIN_CODE_PAGES), default=len(_LATIN_CODE_PAGES))

    tops = sorted((reading for reading in readings if shares[reading] == top), key=rank)
    if len(tops) > 1 and rank(tops[0]) == rank(tops[1]) == len(_LATIN_CODE_PAGES):
        letters = [tuple(char if char.isalpha() else None for char in reading)
                   for reading in tops[:2]]
        if letters[0] != letters[1]:
            raise _ambiguity(name, tops[:2], [_preferred(readings[r])[0] for r in tops[:2]])
    return _preferred(readings[tops[0]])


def _same_reading_as_best(name, matches, best, best_reading, present):
    """The detector's guesses that score as well as the best one and read the file as it does;
    tied guesses that read it differently are an error naming both (nothing here can tell)."""
    same = [best.encoding, *best.could_be_from_charset]
    for match in matches:
        if match is best or (match.chaos, match.coherence) != (best.chaos, best.coherence):
            continue
        reading = _byte_readings(match.encoding, present)
        if best_reading is None or reading is None:
            continue  # a multi-byte codec: left to the detector's order
        if reading != best_reading:
            raise _ambiguity(name, [best_reading, reading],
                             [_preferred(same)[0], _preferred(match.could_be_from_charset)[0]])
        same += match.could_be_from_charset
    return _preferred(dict.fromkeys(same))


def _detected_candidates(raw, name="input"):
    """Codecs to try, best first, from the charset detector; empty when it has no guess."""
    matches = from_bytes(raw)
    best = matches.best()
    if best is None:
        return []
    candidates = []
    if best.encoding in _KOREAN_ENCODINGS or best.language == "Korean":
        if _EUC_KR_FILLER in raw:
            candidates.append("euc_kr")
        candidates.append("cp949")
    else:
        all_counts = np.bincount(np.frombuffer(raw, np.uint8), minlength=256)
        present = [value for value in range(128, 256) if all_counts[value]]
        counts = [int(all_counts[value]) for value in present]
        best_reading = _byte_readings(best.encoding, present)
        candidates += (_latin_reading(name, matches, best, best_reading, present, counts)
                       or _same_reading_as_best(name, matches, best, best_reading, present))
    candidates.append(best.encoding)
    candidates += [match.encoding for match in matches]
    return list(dict.fromkeys(candidates))


_ESCAPED_BYTE = re.compile("[\udc80-\udcff]")
_NON_ASCII = re.compile("[^\x00-\x7f]")
_DAMAGE_WINDOW = 2 ** 19  # bytes read either side of the first bad one


def _refuse_damaged_utf8(raw, name, first_bad_offset, first_bad):
    """UTF-8 text with a few bad bytes (a cut or a bit flip) is not in some other encoding: a
    single-byte codec would read every accented letter in it as two wrong ones. Around its first
    bad byte such a file has more well-formed multi-byte UTF-8 characters than bad bytes, which a
    file really in a legacy encoding does not (its accented letters and Hangul rarely form valid
    UTF-8 sequences). The window keeps this cheap on a large file."""
    start = max(first_bad_offset - _DAMAGE_WINDOW, 0)
    end = min(first_bad_offset + _DAMAGE_WINDOW, len(raw))
    while 0 < start < first_bad_offset and raw[start] & 0xC0 == 0x80:  # not mid-character
        start += 1
    while end < len(raw) and raw[end] & 0xC0 == 0x80:
        end -= 1
    text = raw[start:end].decode("utf-8", errors="surrogateescape")
    bad = len(_ESCAPED_BYTE.findall(text))
    well_formed = len(_NON_ASCII.findall(text)) - bad
    if well_formed > bad:
        raise CharRNNError(
            f"{name} is UTF-8 with bad bytes ({first_bad}): repair the file, or pass --encoding "
            f"if it is in another encoding (e.g. cp949, shift_jis or latin-1)"
        )


def decode_bytes(raw: bytes, encoding: str | None = None, name: str = "input") -> tuple[str, str]:
    """Decode a file's bytes; return (text, name of the codec used).

    `encoding` forces a codec (strictly). Without it: a byte-order mark picks UTF-8/16/32; else
    any NUL byte means binary; else strict UTF-8, then the charset detector, each guess checked
    by a strict decode. `name` (usually the path) appears in error messages.
    """
    if encoding is not None:
        return _strict_decode(raw, encoding, name)
    for bom, codec in _BOMS:
        if raw.startswith(bom):
            try:
                return raw.decode(codec), codec
            except UnicodeDecodeError:
                # FF FE 00 00 is also a UTF-16-LE mark followed by a NUL character.
                continue
    # Before UTF-8: NUL is valid UTF-8, but text almost never holds it, while binary files and
    # UTF-16/32 without a byte-order mark (ASCII-range UTF-16 is valid UTF-8) are full of it.
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise CharRNNError(
            f"{name} looks binary (NUL bytes at offset {nul}): give a text file, or pass "
            f"--encoding (e.g. utf-16-le) if it is UTF-16/32 text without a byte-order mark"
        )
    try:
        return raw.decode("utf-8"), "utf-8"
    except UnicodeDecodeError as error:
        not_utf8 = f"byte 0x{raw[error.start]:02x} at offset {error.start} is not UTF-8"
        _refuse_damaged_utf8(raw, name, error.start, not_utf8)
    for codec in _detected_candidates(raw, name):
        try:
            return raw.decode(codec), _codec_name(codec)
        except (UnicodeDecodeError, LookupError):
            continue
    raise CharRNNError(
        f"{name} is binary or in an unknown encoding ({not_utf8}): if it is text, pass "
        f"--encoding ({_ENCODING_HINT})"
    )


def read_text(path, encoding: str | None = None) -> tuple[str, str]:
    """Read a text file; return (text, name of the codec used). See decode_bytes."""
    path = Path(path)
    if path.is_dir():
        raise CharRNNError(f"{path} is a directory, not a text file: give the path of a file")
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise CharRNNError(f"text file {path} does not exist: check the path") from None
    except OSError as error:
        raise CharRNNError(
            f"cannot read {path}: {error.strerror or error}; check the path and its permissions"
        ) from None
    if not raw:
        raise CharRNNError(f"text file {path} is empty: give a file with some text in it")
    return decode_bytes(raw, encoding, name=str(path))


def contains_hangul(text: str) -> bool:
    """True when text has a precomposed Hangul syllable, the thing decompose_hangul splits."""
    return _SYLLABLE_RE.search(text) is not None


def decompose_hangul(text: str) -> str:
    """Split every Hangul syllable into conjoining jamo; escape pre-existing jamo and escapes.

    Vectorised over code points with numpy: about 0.4 s for 10 MB of UTF-8 Korean prose
    (3.4 M syllables) on one CPU core.
    """
    if not text:
        return text
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
    is_syllable = (codes >= _S_BASE) & (codes < _S_BASE + _S_COUNT)
    is_escaped = ((codes >= _JAMO_FIRST) & (codes <= _JAMO_LAST)) | (codes == _ESCAPE_CODE)
    syllables = codes[is_syllable] - np.uint32(_S_BASE)
    finals = syllables % _T_COUNT
    has_final = finals > 0
    # Output code points per input code point: 1 plain, 2 escaped or LV, 3 LVT.
    lengths = np.ones(codes.size, dtype=np.int64)
    lengths[is_syllable] += 1 + has_final
    lengths[is_escaped] += 1
    ends = np.cumsum(lengths)
    starts = ends - lengths
    out = np.empty(int(ends[-1]), dtype="<u4")

    plain = ~(is_syllable | is_escaped)
    out[starts[plain]] = codes[plain]

    escaped_starts = starts[is_escaped]
    out[escaped_starts] = _ESCAPE_CODE
    out[escaped_starts + 1] = codes[is_escaped]

    syllable_starts = starts[is_syllable]
    out[syllable_starts] = _L_BASE + syllables // _N_COUNT
    out[syllable_starts + 1] = _V_BASE + (syllables % _N_COUNT) // _T_COUNT
    out[syllable_starts[has_final] + 2] = _T_BASE + finals[has_final]
    return out.tobytes().decode("utf-32-le", "surrogatepass")


def _compose_match(match):
    escaped, initial, medial, final = match.groups()
    if escaped is not None:
        return escaped
    code = _S_BASE + ((ord(initial) - _L_BASE) * _V_COUNT + ord(medial) - _V_BASE) * _T_COUNT
    if final is not None:
        code += ord(final) - _T_BASE
    return chr(code)


def compose_hangul(text: str) -> str:
    """Inverse of decompose_hangul: join L V [T] jamo runs into syllables, unescape the rest.

    Also safe on sampled text: loose jamo stay as they are, and a dangling escape mark at the
    end is kept. One regex pass with a Python callback per syllable: about 2 s for the jamo of
    10 MB of Korean prose, far more than sampling ever produces.
    """
    return _COMPOSE_RE.sub(_compose_match, text)
