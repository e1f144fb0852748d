"""Puts tests/ on sys.path (pytest does this for a folder with a conftest.py), so test modules in
any folder can share helpers such as ``from model.model_helpers import make_cfg``."""
