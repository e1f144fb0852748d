"""Tools that work on a config or a trained model outside the training loop: `info`, weights in
and out of files, KHA absorption, MEA virtual heads and the Hugging Face export. They may import
the model and the training package (checkpoint reading); nothing in model/ or training/ imports
them."""
