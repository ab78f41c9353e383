"""Decoding corpus bytes (encodings, binary, errors) and the Hangul jamo round trip."""

import codecs
import unicodedata

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tf_charrnn import text as text_module
from tf_charrnn.errors import CharRNNError
from tf_charrnn.text import (
    HANGUL_ESCAPE,
    compose_hangul,
    contains_hangul,
    decode_bytes,
    decompose_hangul,
    read_text,
)

# Only KS X 1001 syllables, so it is plain EUC-KR.
KOREAN = (
    "봄이 오면 마을 뒤편 언덕에는 진달래가 가득 핀다. 아이들은 학교가 끝나면 책가방을 던져 두고 "
    "언덕으로 달려가 꽃잎을 따서 입에 물고 웃었다. 할머니는 그런 아이들을 보며 옛날이야기를 "
    "들려주곤 하셨다.\n옛날 옛적에 깊은 산속 작은 집에 오누이가 살았다고 한다. 어머니는 고개 너머 "
    "잔칫집에 일을 하러 가셨고, 해가 저물도록 돌아오지 않으셨다. 배가 고픈 오누이는 문을 꼭 "
    "잠그고 어머니를 기다렸다. 그때 누군가 문을 두드리며 말했다. \"얘들아, 엄마 왔다. 문 좀 "
    "열어 다오.\" 그러나 목소리가 이상하게 굵고 거칠었다.\r\n누이는 문틈으로 손을 내밀어 보라고 "
    "했다. 털이 숭숭 난 커다란 손이 들어오자 오누이는 깜짝 놀라 뒷문으로 빠져나가 우물가의 큰 "
    "나무 위로 올라갔다. 밤하늘에는 별이 총총했고, 바람은 차가웠다. 두 아이는 하늘을 향해 두 "
    "손을 모으고 간절히 빌었다. 그러자 하늘에서 튼튼한 동아줄이 내려왔다.\n"
)
# 똠 and 햏 are outside KS X 1001: CP949 encodes them directly, EUC-KR cannot.
CP949_ONLY = "시장 골목 끝 똠얌 가게 주인은 손님이 오면 햏 하고 웃었다.\n"

GERMAN = (
    "Über den Dächern der Stadt schläft die Katze, während unten die Bäckerin frühmorgens "
    "Brötchen und süße Hörnchen aus dem Ofen holt. Die Straßenbahn quietscht, ein Hund bellt, "
    "und die ersten Fahrräder rollen über das nasse Kopfsteinpflaster zur Brücke am Fluss.\n"
)
JAPANESE = (
    "駅前の小さな本屋では、毎朝店主がシャッターを上げて新しい雑誌を並べる。近所の学生たちは"
    "放課後になると立ち読みに来て、店主はそれを笑って見ている。雨の日には客が少ないので、"
    "店主は奥の机で古い地図を眺めながらお茶を飲む。\n"
)

ESC = HANGUL_ESCAPE
MIXED = (
    "한국어 문장과 Latin text, 漢字と仮名, emoji 🎉👍🏽, symbols ©∑→\t\r\n"
    "conjoining jamo \u1112\u1161\u11ab and a lone \u11a8, the escape " + ESC + ESC + " itself, "
    "syllable then loose jamo 가\u11a8 각\u1161 한\u1100\u1161, filler \u115f\u1160, end " + ESC
)


# ----------------------------------------------------------------------------- decoding

def test_euc_kr_file_loads_as_the_utf8_text_and_reports_cp949(tmp_path):
    raw = KOREAN.encode("euc_kr")
    assert raw != KOREAN.encode("utf-8")
    path = tmp_path / "ko-euc.txt"
    path.write_bytes(raw)
    assert read_text(path) == (KOREAN, "cp949")


def test_cp949_file_with_syllables_outside_euc_kr_loads_as_the_utf8_text(tmp_path):
    text = KOREAN + CP949_ONLY
    raw = text.encode("cp949")
    with pytest.raises(UnicodeDecodeError):
        raw.decode("euc_kr")
    path = tmp_path / "ko-cp949.txt"
    path.write_bytes(raw)
    assert read_text(path) == (text, "cp949")


def test_euc_kr_make_up_sequences_decode_to_the_syllable():
    text = KOREAN + "똠얌\n"
    raw = text.encode("euc_kr")  # 똠 becomes the 8-byte filler + jamo sequence
    assert b"\xa4\xd4" in raw
    assert decode_bytes(raw) == (text, "euc_kr")


@pytest.mark.parametrize("raw, codec", [
    (codecs.BOM_UTF16_LE + MIXED.encode("utf-16-le"), "utf-16"),
    (codecs.BOM_UTF16_BE + MIXED.encode("utf-16-be"), "utf-16"),
    (codecs.BOM_UTF32_LE + MIXED.encode("utf-32-le"), "utf-32"),
    (codecs.BOM_UTF8 + MIXED.encode("utf-8"), "utf-8-sig"),
    (MIXED.encode("utf-8"), "utf-8"),
])
def test_byte_order_mark_or_utf8_decodes_exactly(raw, codec):
    assert decode_bytes(raw) == (MIXED, codec)


def test_line_endings_are_kept_exactly():
    text = "one\r\ntwo\rthree\n\n"
    assert decode_bytes(text.encode("utf-8"))[0] == text
    crlf = GERMAN.replace("\n", "\r\n") + "\r" + text
    assert decode_bytes(crlf.encode("latin-1"))[0] == crlf
    assert decode_bytes(crlf.encode("utf-16"))[0] == crlf


def test_latin1_file_is_detected():
    text, used = decode_bytes(GERMAN.encode("latin-1"))
    assert text == GERMAN
    assert used == "cp1252"  # the same text for these characters, and the commoner name


def test_latin1_can_be_forced():
    raw = "façade, naïve, Æsir, ¿qué?\n".encode("latin-1")
    assert decode_bytes(raw, encoding="latin-1") == ("façade, naïve, Æsir, ¿qué?\n", "iso8859-1")


def test_shift_jis_file_is_detected():
    text, used = decode_bytes(JAPANESE.encode("shift_jis"))
    assert text == JAPANESE
    assert used in ("cp932", "shift_jis", "shift_jis_2004", "shift_jisx0213")


def test_shift_jis_can_be_forced():
    assert decode_bytes(JAPANESE.encode("shift_jis"), encoding="Shift_JIS") == (JAPANESE,
                                                                                "shift_jis")


def test_nul_bytes_mean_binary(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xd8")
    with pytest.raises(CharRNNError, match=r"weights\.bin looks binary \(NUL bytes at offset 8\)"
                                           r".*--encoding"):
        read_text(path)


def test_utf16_without_a_byte_order_mark_is_refused_as_binary_not_misread_as_utf8():
    with pytest.raises(CharRNNError, match="looks binary .*utf-16-le"):
        decode_bytes("plain ascii".encode("utf-16-le"))
    assert decode_bytes("plain ascii".encode("utf-16-le"), "utf-16-le") == ("plain ascii",
                                                                            "utf-16-le")


def test_forced_wrong_encoding_names_file_encoding_and_offset():
    raw = KOREAN.encode("cp949")
    with pytest.raises(CharRNNError) as caught:
        decode_bytes(raw, encoding="utf-8", name="data/ko.txt")
    message = str(caught.value)
    assert "\n" not in message
    assert "cannot decode data/ko.txt as utf-8" in message
    assert "byte offset 0" in message
    assert "try a different --encoding" in message


def test_unknown_encoding_name_is_a_clear_error():
    with pytest.raises(CharRNNError, match="unknown encoding 'klingon' for x.txt: give a codec"):
        decode_bytes(b"abc", encoding="klingon", name="x.txt")


def test_undecodable_bytes_say_binary_or_unknown_encoding(monkeypatch):
    # Pretend the detector's only guess does not hold up under a strict decode.
    monkeypatch.setattr(text_module, "_detected_candidates",
                        lambda raw, name: ["utf-8", "ascii"])
    with pytest.raises(CharRNNError, match=r"blob is binary or in an unknown encoding \(byte "
                                           r"0xff at offset 0 is not UTF-8\): .*--enc"):
        decode_bytes(b"\xff\xfe\xfd", name="blob")


def test_a_stray_byte_in_utf8_text_is_an_error_naming_its_offset():
    raw = "naïve café, all UTF-8\n".encode("utf-8") * 20 + b"\xff" + b"and more text\n" * 20
    offset = raw.index(b"\xff")
    with pytest.raises(CharRNNError, match=rf"stray.txt is UTF-8 with bad bytes \(byte 0xff at "
                                           rf"offset {offset} is not UTF-8\): repair the file"):
        decode_bytes(raw, name="stray.txt")  # not read as iso8859-10, every ï turned into Ã¯


def test_utf8_damage_far_into_a_large_file_is_judged_around_the_bad_byte():
    before = ("ascii only\n" * 200_000 + "é à ü\n" * 500).encode("utf-8")  # 2.2 MB
    raw = before + b"\xff" + "é à ü\n".encode("utf-8") * 500
    with pytest.raises(CharRNNError, match=f"offset {len(before)} is not UTF-8"):
        decode_bytes(raw, name="big.txt")


@pytest.mark.parametrize("text, encoding", [
    ("Příliš žluťoučký kůň úpěl ďábelské ódy. Řeřicha roste, když prší.\n", "cp1250"),
    ("Zażółć gęślą jaźń. Pchnąć w tę łódź jeża lub ośm skrzyń fig.\n", "cp1250"),
    ("Árvíztűrő tükörfúrógép. Öt szép szűz lány őrült írót nyúz.\n", "cp1250"),
    ("Đačić je čitao knjigu o šumi, a žena je kuhala. Ćevapi su ukusni.\n", "cp1250"),
    ("Fiecare om are dreptul la învăţătură. Ştiinţa şi ţara sunt frumoase.\n", "cp1250"),
    ("Größere Übungen für Mädchen, die Straße entlang.\n", "cp1252"),
    ("Où est l'hôtel? Ça coûte cher, naïve Noël à Zürich, façade élève.\n", "cp1252"),
    ("El niño comió una piña en la montaña. ¿Qué año es? ¡Olé!\n", "cp1252"),
    ("A situação é difícil, mas não impossível. Ação e coração.\n", "cp1252"),
    ("He said \u201chello\u201d \u2014 and left. It\u2019s fine.\n", "cp1252"),
    ("Įlinkdama fechtuotojo špaga sublykčiojusi pragręžė apvalų arbūzą.\n", "cp1257"),
    ("Съешь же ещё этих мягких французских булок, да выпей чаю.\n", "cp1251"),
])
@pytest.mark.parametrize("copies", [3, 60])
def test_legacy_single_byte_text_is_read_right(text, encoding, copies):
    """The detector alone got several of these wrong: French Latin-1 as cp1257 or cp1250 (à as
    ą or ŕ), Romanian cp1250 as cp1252, Spanish as iso8859_14 (¿ as ṡ), curly quotes as
    mac-iceland. Among Latin readings, the one whose accented letters fit one language wins."""
    assert decode_bytes((text * copies).encode(encoding)) == (text * copies, encoding)


class FakeGuess:
    """A charset_normalizer match, as much of it as decode_bytes reads."""

    def __init__(self, encoding, chaos=0.0, coherence=0.5):
        self.encoding, self.chaos, self.coherence = encoding, chaos, coherence
        self.could_be_from_charset, self.language = [encoding], "Unknown"


class FakeGuesses(list):
    def best(self):
        return self[0] if self else None


def test_tied_guesses_that_read_the_text_differently_are_an_error_naming_both(monkeypatch):
    """Where nothing can tell two equally scored guesses apart (Cyrillic here: no alphabet test),
    the user picks with --encoding."""
    text = "Съешь же ещё этих мягких французских булок.\n" * 10
    monkeypatch.setattr(text_module, "from_bytes",
                        lambda raw: FakeGuesses([FakeGuess("koi8_r"), FakeGuess("cp1251")]))
    with pytest.raises(CharRNNError, match=r"^x.txt reads as (\S ){4}\S in koi8_r and as (\S ){4}"
                                           r"\S in cp1251, and the detector cannot tell which: "
                                           r"pass the --encoding that gives the text's letters"):
        decode_bytes(text.encode("cp1251"), name="x.txt")
    monkeypatch.setattr(text_module, "from_bytes", lambda raw: FakeGuesses(
        [FakeGuess("koi8_r"), FakeGuess("cp1251", chaos=0.1)]))  # not tied: the best one
    assert decode_bytes(text.encode("cp1251"))[1] == "koi8-r"


def test_decoding_never_drops_or_replaces_bytes():
    for raw in (KOREAN.encode("cp949"), GERMAN.encode("latin-1"), JAPANESE.encode("shift_jis")):
        text, used = decode_bytes(raw)
        assert "\ufffd" not in text
        assert text.encode(used) == raw


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(CharRNNError, match=r"text file .*nope\.txt does not exist: check the path"):
        read_text(tmp_path / "nope.txt")


def test_directory_is_a_clear_error(tmp_path):
    with pytest.raises(CharRNNError, match="is a directory, not a text file: give the path"):
        read_text(tmp_path)


def test_empty_file_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.txt"
    path.write_bytes(b"")
    with pytest.raises(CharRNNError, match=r"empty\.txt is empty: give a file with some text"):
        read_text(path)


# ----------------------------------------------------------------------------- Hangul

def test_syllables_split_into_conjoining_jamo():
    assert decompose_hangul("가") == "\u1100\u1161"
    assert decompose_hangul("한") == "\u1112\u1161\u11ab"
    assert decompose_hangul("힣") == "\u1112\u1175\u11c2"
    assert compose_hangul("\u1112\u1161\u11ab\u1100\u1173\u11af") == "한글"


def test_every_syllable_decomposes_as_unicode_nfd_does():
    syllables = "".join(map(chr, range(0xAC00, 0xD7A4)))
    jamo = decompose_hangul(syllables)
    assert jamo == unicodedata.normalize("NFD", syllables)
    assert compose_hangul(jamo) == syllables


def test_existing_jamo_and_escape_marks_are_escaped():
    assert decompose_hangul("\u1100") == ESC + "\u1100"
    assert decompose_hangul(ESC) == ESC + ESC
    assert decompose_hangul("가\u11a8") == "\u1100\u1161" + ESC + "\u11a8"


def test_mixed_text_round_trips():
    jamo = decompose_hangul(MIXED)
    assert not contains_hangul(jamo)
    assert "漢字と仮名" in jamo and "🎉👍🏽" in jamo and "©∑→" in jamo
    assert compose_hangul(jamo) == MIXED


def test_text_without_hangul_is_unchanged():
    for text in ("", "plain ascii\n", "漢字 🎉 ©"):
        assert decompose_hangul(text) == text
        assert compose_hangul(text) == text


def test_sampled_loose_jamo_and_dangling_escape_are_kept():
    assert compose_hangul("\u1100x\u1161\u11a8") == "\u1100x\u1161\u11a8"
    assert compose_hangul("\u1100\u1161" + ESC) == "가" + ESC
    assert compose_hangul(ESC + "\n") == "\n"


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_compose_inverts_decompose_on_any_text(text):
    assert compose_hangul(decompose_hangul(text)) == text


# Dense in the code points the escape scheme has to tell apart.
_TRICKY = st.sampled_from([ESC, "\u1100", "\u1112", "\u1113", "\u115f", "\u1160", "\u1161",
                           "\u1175", "\u1176", "\u11a7", "\u11a8", "\u11c2", "\u11c3", "\u11ff",
                           "가", "각", "힣", "a", "\n", "\ud7a4", "\u3131"])


@settings(max_examples=300, deadline=None)
@given(st.text(st.one_of(_TRICKY, st.characters())))
def test_compose_inverts_decompose_on_jamo_heavy_text(text):
    assert compose_hangul(decompose_hangul(text)) == text


def test_decomposition_shrinks_the_korean_alphabet():
    syllables = {char for char in KOREAN if contains_hangul(char)}
    jamo = {char for char in decompose_hangul(KOREAN) if "\u1100" <= char <= "\u11ff"}
    assert len(syllables) > 100
    assert 20 <= len(jamo) <= 50  # at most 19 initials + 21 medials + 27 finals exist
    assert len(set(decompose_hangul(KOREAN))) < len(set(KOREAN)) / 2


def test_contains_hangul_looks_for_syllables():
    assert contains_hangul("abc 한 def")
    assert not contains_hangul("abc \u1112\u1161 ㅎ def")
