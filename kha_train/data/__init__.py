"""Data: tokenizer, dataset preparation and the resumable packed loader (docs/data.md).

Import what you use from its module (``from kha_train.data.loader import PackedLoader``): this
package imports nothing, so registering its commands (``kha_train.data.commands``) does not
import torch.
"""
