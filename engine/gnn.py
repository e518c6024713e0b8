"""Graph neural networks of the graph-labelling pipeline (torch-geometric, pure torch on CPU).

Spec: ../shared/papers/graph-labelling-tool-sentinel2-2025.txt, section 2.6 and 3.5: three
layers, GCN with 60 hidden features or GATv2 with 8 heads x 8 features (= 64), the third layer
maps to the C fuzzy c-means classes and is trained with cross-entropy against the mean membership
of each segment; the embedding is the output of layer 2.

Choices where the paper is silent
---------------------------------
* The embedding is the output of the second convolution before its non-linearity: after a ReLU
  many coordinates are exactly 0, which makes cosine similarities (chip matching, UMAP) coarser.
* Messages flow from a segment's k spatial neighbours to the segment (edge j -> i for each
  neighbour j of i), so every node aggregates exactly its k neighbours (plus itself).
* Node features are standardised per feature before training; Adam with weight decay, full
  batch (the whole scene is one graph: tens of thousands of nodes fit easily).
* The GCN gets its graph as a sparse CSR adjacency (sparse matrix products) rather than an edge
  list (gather/scatter per edge): same result to float rounding, ~3x faster on a CPU.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Importing torch-geometric 2.7 calls torch.jit.script, which torch 2.13 deprecates: QGIS shows
# that DeprecationWarning in its Python warnings tab on every start, noise users can do nothing
# about. Ignored narrowly: DeprecationWarnings raised inside torch or torch-geometric while
# torch-geometric is imported; warnings from our code, or later ones, are untouched.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", category=DeprecationWarning,
                            module=r"(torch|torch_geometric)(\.|$)")
    from torch_geometric.nn import GATv2Conv, GCNConv
    from torch_geometric.utils import to_torch_csr_tensor

from engine.monitor import Monitor, silent  # noqa: E402 - after the guarded import

GNN_CHOICES = ("gcn", "gatv2")
GCN_HIDDEN = 60
GAT_HEADS = 8
GAT_HEAD_FEATURES = 8


class GCNEmbedder(nn.Module):
    def __init__(self, in_features: int, n_classes: int, hidden: int = GCN_HIDDEN):
        super().__init__()
        # cached: the graph is fixed (one scene, full batch), so the normalised adjacency is
        # computed once, not in every forward pass.
        self.conv1 = GCNConv(in_features, hidden, cached=True)
        self.conv2 = GCNConv(hidden, hidden, cached=True)
        self.conv3 = GCNConv(hidden, n_classes, cached=True)
        self.embedding_dim = hidden

    def embed(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(x, edge_index)), edge_index)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.embed(x, edge_index)
        return self.conv3(F.relu(embedding), edge_index), embedding


class GATv2Embedder(nn.Module):
    def __init__(self, in_features: int, n_classes: int, heads: int = GAT_HEADS,
                 head_features: int = GAT_HEAD_FEATURES):
        super().__init__()
        self.conv1 = GATv2Conv(in_features, head_features, heads=heads)
        self.conv2 = GATv2Conv(heads * head_features, head_features, heads=heads)
        self.conv3 = GATv2Conv(heads * head_features, n_classes, heads=1)
        self.embedding_dim = heads * head_features

    def embed(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.elu(self.conv1(x, edge_index)), edge_index)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        embedding = self.embed(x, edge_index)
        return self.conv3(F.elu(embedding), edge_index), embedding


def make_gnn(kind: str, in_features: int, n_classes: int) -> nn.Module:
    kind = (kind or "").lower()
    if kind == "gcn":
        return GCNEmbedder(in_features, n_classes)
    if kind == "gatv2":
        return GATv2Embedder(in_features, n_classes)
    raise ValueError(f"Unknown GNN type '{kind}': choose one of {', '.join(GNN_CHOICES)}.")


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Categorical cross-entropy against a probability vector per node (mean over nodes)."""
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


def message_edges(edges: np.ndarray) -> torch.Tensor:
    """kNN edges (segment, neighbour) -> torch-geometric edge_index (source=neighbour,
    target=segment)."""
    return torch.from_numpy(np.ascontiguousarray(np.asarray(edges, dtype=np.int64)[::-1]))


def standardise_features(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    spread = features.std(axis=0)
    return ((features - features.mean(axis=0)) / np.where(spread > 0, spread, 1.0)).astype(
        np.float32)


@dataclass
class GNNReport:
    losses: list[float] = field(default_factory=list)
    embedding_dim: int = 0


def train_gnn(
    kind: str,
    features: np.ndarray,
    edges: np.ndarray,
    memberships: np.ndarray,
    epochs: int = 200,
    learning_rate: float = 0.01,
    weight_decay: float = 5e-4,
    device: torch.device | None = None,
    monitor: Monitor | None = None,
) -> tuple[np.ndarray, GNNReport]:
    """Train the GNN on the whole scene graph; return (embeddings (n, E) float32, report).

    ``features`` (n, F) node features, ``edges`` (2, n*k) (segment, neighbour) pairs,
    ``memberships`` (n, C) targets (rows sum to 1). Seed torch before calling."""
    monitor = monitor or silent()
    device = device or torch.device("cpu")
    x = torch.from_numpy(standardise_features(features)).to(device)
    edge_index = message_edges(edges).to(device)
    if kind.lower() == "gcn":
        # adj_t[target, source]: row i holds the neighbours i aggregates, i.e. the kNN lists.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "sparse CSR tensor support is in beta"
            edge_index = to_torch_csr_tensor(edge_index.flip(0), size=(x.shape[0], x.shape[0]))
    target = torch.from_numpy(np.asarray(memberships, dtype=np.float32)).to(device)
    model = make_gnn(kind, x.shape[1], target.shape[1]).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    report = GNNReport(embedding_dim=model.embedding_dim)
    model.train()
    for epoch in range(epochs):
        logits, _ = model(x, edge_index)
        loss = soft_cross_entropy(logits, target)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        report.losses.append(loss.item())
        if (epoch + 1) % 50 == 0 or epoch + 1 == epochs:
            monitor.info(f"GNN epoch {epoch + 1}: loss {report.losses[-1]:.4f}")
        monitor.progress((epoch + 1) / max(epochs, 1))
    model.eval()
    with torch.no_grad():
        embedding = model.embed(x, edge_index)
    return embedding.cpu().numpy().astype(np.float32), report
