import pytest

from fidelity.lengths import format_length, parse_length


@pytest.mark.parametrize(
    ("text", "tokens"),
    [
        ("60k", 60_000),
        ("1.5k", 1_500),
        ("400000", 400_000),
        ("2M", 2_000_000),
        ("8K", 8_000),
        (" 512 ", 512),
        ("0.5m", 500_000),
        (1024, 1024),
    ],
)
def test_parse_length_accepts_documented_forms(text, tokens):
    assert parse_length(text) == tokens


@pytest.mark.parametrize(
    "text", ["abc", "0", "-5", "1.2.3k", "", "k", "5g", "1e3", "0k", "1.2345k"]
)
def test_parse_length_rejects_with_accepted_forms(text):
    with pytest.raises(ValueError, match=r"invalid length|must be positive|whole number"):
        parse_length(text)


def test_parse_length_rejects_bad_types():
    with pytest.raises(TypeError):
        parse_length(3.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        parse_length(True)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="positive"):
        parse_length(0)


def test_error_names_accepted_forms():
    with pytest.raises(ValueError, match="60k"):
        parse_length("abc")


@pytest.mark.parametrize(
    ("tokens", "label"), [(60_000, "60k"), (1_500, "1.5k"), (512, "512"), (2_000_000, "2M")]
)
def test_format_length_round_trips(tokens, label):
    assert format_length(tokens) == label
    assert parse_length(label) == tokens
