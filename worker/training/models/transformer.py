"""A small pre-norm Transformer encoder classifier over tokens.

Encoder of Vaswani et al. 2017 with LayerNorm before each sublayer and once at the end
(pre-norm: Xiong et al. 2020, which trains without warmup tricks at small scale);
learned positions and 0.02-std embeddings as in BERT/GPT-2; optional [CLS] pooling as
in BERT and ViT, else the mean over positions.
"""

from __future__ import annotations

import torch
from torch import nn

from shared.dataset_catalog import DatasetInfo
from shared.model_catalog import TransformerParams
from worker.training.models.activations import make_activation
from worker.training.models.recurrent import vocab_size_of


class TransformerClassifier(nn.Module):
    def __init__(
        self, vocab_size: int, seq_len: int, params: TransformerParams, num_outputs: int
    ) -> None:
        super().__init__()
        self.use_cls = params.pooling == "cls"
        self.embedding = nn.Embedding(vocab_size, params.d_model)
        self.position = nn.Parameter(torch.zeros(1, seq_len + int(self.use_cls), params.d_model))
        self.cls = nn.Parameter(torch.zeros(1, 1, params.d_model)) if self.use_cls else None
        layer = nn.TransformerEncoderLayer(
            params.d_model,
            params.heads,
            params.ff_dim,
            params.dropout,
            # A ReLU or GELU module still takes torch's fused inference path, as the
            # string names did.
            activation=make_activation(params.activation),
            batch_first=True,
            norm_first=True,
        )
        # Nested tensors only help with padding masks, and torch warns that pre-norm
        # layers cannot use them anyway.
        self.encoder = nn.TransformerEncoder(
            layer, params.layers, norm=nn.LayerNorm(params.d_model), enable_nested_tensor=False
        )
        self.classifier = nn.Linear(params.d_model, num_outputs)
        nn.init.normal_(self.embedding.weight, std=0.02)
        nn.init.normal_(self.position, std=0.02)
        if self.cls is not None:
            nn.init.normal_(self.cls, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embedding(tokens)
        if self.cls is not None:
            x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
        x = self.encoder(x + self.position)
        pooled = x[:, 0] if self.use_cls else x.mean(dim=1)
        return self.classifier(pooled)


def build_transformer(params: TransformerParams, info: DatasetInfo) -> nn.Module:
    (seq_len,) = info.input_shape
    return TransformerClassifier(vocab_size_of(info), seq_len, params, info.output_dim)
