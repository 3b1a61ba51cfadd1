"""navit_clip.text (folder text/): the SentencePiece tokenizer (host side) and the text tower."""
