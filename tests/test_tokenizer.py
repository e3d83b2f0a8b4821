"""The offline CLIP tokenizer gives openai/clip-vit-large-patch14's ids, padding and truncation."""

from models.tokenizer import BOS_ID, EOS_ID, MAX_LENGTH, tokenize


def test_known_prompt_ids():
    ids = tokenize(["a bird, best quality, extremely detailed"])
    # a</w>=320 bird</w>=3329 ,</w>=267 best</w>=949 quality</w>=3027 extremely</w>=6519 detailed</w>=12609
    assert ids[0, :10].tolist() == [BOS_ID, 320, 3329, 267, 949, 3027, 267, 6519, 12609, EOS_ID]
    assert ids.shape == (1, MAX_LENGTH)
    assert (ids[0, 10:] == EOS_ID).all()  # padded with <|endoftext|>


def test_case_and_whitespace_are_normalised():
    assert tokenize(["A  Bird"]).tolist() == tokenize(["a bird"]).tolist()


def test_long_prompts_are_truncated_with_eos_last():
    ids = tokenize(["bird " * 200])
    assert ids.shape == (1, MAX_LENGTH)
    assert ids[0, 0].item() == BOS_ID and ids[0, -1].item() == EOS_ID
    assert (ids[0, 1:-1] == 3329).all()


def test_empty_prompt():
    ids = tokenize([""])
    assert ids[0, :2].tolist() == [BOS_ID, EOS_ID]
