"""LSTM and GRU sequence classifiers over token embeddings."""

from __future__ import annotations

import torch
from torch import nn

from shared.dataset_catalog import DatasetInfo
from shared.model_catalog import RNNParams
from worker.training.models.activations import make_activation


class RecurrentClassifier(nn.Module):
    """Embedding -> LSTM/GRU stack -> final hidden state(s) -> [activation] -> Dropout -> Linear.

    The activation (none unless asked for) is the head's: torch's LSTM and GRU fix their
    cells' tanh and sigmoid gates.
    """

    def __init__(
        self,
        cell: type[nn.LSTM] | type[nn.GRU],
        vocab_size: int,
        params: RNNParams,
        num_outputs: int,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, params.embedding_dim)
        self.rnn = cell(
            params.embedding_dim,
            params.hidden,
            num_layers=params.layers,
            batch_first=True,
            bidirectional=params.bidirectional,
            # torch applies this between layers only, and warns when there is one layer.
            dropout=params.dropout if params.layers > 1 else 0.0,
        )
        self.is_lstm = cell is nn.LSTM
        self.directions = 2 if params.bidirectional else 1
        # Identity has no parameters: the state-dict keys stay as they were without it.
        self.activation = make_activation(params.activation) if params.activation else nn.Identity()
        self.dropout = nn.Dropout(params.dropout)
        self.classifier = nn.Linear(self.directions * params.hidden, num_outputs)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        out = self.rnn(self.embedding(tokens))
        h_n = out[1][0] if self.is_lstm else out[1]  # (layers * directions, N, hidden)
        # The top layer's final states: forward after the last token (== the last time
        # step's output) and, when bidirectional, backward after the first token. The
        # backward half of output[:, -1] would have seen only one token.
        last = h_n[-self.directions :].transpose(0, 1).reshape(tokens.shape[0], -1)
        return self.classifier(self.dropout(self.activation(last)))


def vocab_size_of(info: DatasetInfo) -> int:
    """The token vocabulary of a sequence dataset (embedding rows)."""
    if not info.vocab_size:
        raise ValueError(f"{info.name!r} has no vocabulary; sequence models take token datasets")
    return info.vocab_size


def build_lstm(params: RNNParams, info: DatasetInfo) -> nn.Module:
    return RecurrentClassifier(nn.LSTM, vocab_size_of(info), params, info.output_dim)


def build_gru(params: RNNParams, info: DatasetInfo) -> nn.Module:
    return RecurrentClassifier(nn.GRU, vocab_size_of(info), params, info.output_dim)
