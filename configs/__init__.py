"""navit_clip.configs (folder configs/): recipes, one `get_config(arg)` per file."""
