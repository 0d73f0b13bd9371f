"""The two-stream grader network (PyTorch).

Stream 1, an SE-Residual CNN over the symmetry map (C, T, P): a 3x3 stem (stride 2 in time) and three
residual blocks,
each with a squeeze-and-excitation gate (global average pool → bottleneck MLP → sigmoid channel
weights), the last two halving time and landmarks; global average pool → a vector.
Stream 2, a bidirectional LSTM over the per-frame displacements (T, 4P) with additive (Bahdanau)
attention over time: e_t = vᵀ tanh(W h_t + b), a = softmax(e), context = Σ a_t h_t. The attention
weights are returned: they say which frames the grade rests on.
Fusion: concatenation → MLP → logits over the grade classes.

About 0.1 M parameters (≈ 0.5 MB of float32 weights).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters; stored in the model's metadata so inference rebuilds the same net."""

    n_classes: int
    in_channels: int
    n_pairs: int
    n_frames: int
    motion_features: int
    cnn_widths: tuple[int, ...] = (16, 32, 48)
    se_reduction: int = 4
    lstm_hidden: int = 32
    attention_dim: int = 32
    fusion_hidden: int = 64
    dropout: float = 0.2

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cnn_widths"] = list(self.cnn_widths)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        kw = dict(d)
        kw["cnn_widths"] = tuple(kw["cnn_widths"])
        return cls(**kw)


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int, reduction: int) -> None:
        super().__init__()
        mid = max(4, channels // reduction)
        self.fc = nn.Sequential(
            nn.Linear(channels, mid), nn.ReLU(inplace=True), nn.Linear(mid, channels), nn.Sigmoid()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.fc(x.mean(dim=(2, 3)))
        return x * w[:, :, None, None]


class SEResBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN-SE plus the (projected) input, then ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int, reduction: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(c_out, c_out, 3, padding=1, bias=False),
            nn.BatchNorm2d(c_out),
            SqueezeExcite(c_out, reduction),
        )
        self.skip: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.skip = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.skip(x))


class SymmetryCNN(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        w = cfg.cnn_widths
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_channels, w[0], 3, stride=(2, 1), padding=1, bias=False),
            nn.BatchNorm2d(w[0]),
            nn.ReLU(True),
        )
        blocks: list[nn.Module] = []
        c = w[0]
        for i, width in enumerate(w):
            blocks.append(SEResBlock(c, width, 1 if i == 0 else 2, cfg.se_reduction))
            c = width
        self.blocks = nn.Sequential(*blocks)
        self.out_dim = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x)).mean(dim=(2, 3))


class AttentiveBiLSTM(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.lstm = nn.LSTM(cfg.motion_features, cfg.lstm_hidden, batch_first=True, bidirectional=True)
        self.proj = nn.Linear(2 * cfg.lstm_hidden, cfg.attention_dim)
        self.score = nn.Linear(cfg.attention_dim, 1, bias=False)
        self.out_dim = 2 * cfg.lstm_hidden

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h, _ = self.lstm(x)  # (B, T, 2H)
        e = self.score(torch.tanh(self.proj(h))).squeeze(-1)  # (B, T)
        a = torch.softmax(e, dim=1)
        return torch.bmm(a.unsqueeze(1), h).squeeze(1), a


class GraderNet(nn.Module):
    """``forward(symmetry (B, C, T, P), motion (B, T, 4P)) -> (logits (B, K), attention (B, T))``."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.cnn = SymmetryCNN(cfg)
        self.rnn = AttentiveBiLSTM(cfg)
        self.head = nn.Sequential(
            nn.Linear(self.cnn.out_dim + self.rnn.out_dim, cfg.fusion_hidden),
            nn.ReLU(inplace=True),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.fusion_hidden, cfg.n_classes),
        )

    def forward(self, symmetry: torch.Tensor, motion: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        context, attention = self.rnn(motion)
        return self.head(torch.cat([self.cnn(symmetry), context], dim=1)), attention


def build_model(cfg: ModelConfig) -> GraderNet:
    return GraderNet(cfg)
