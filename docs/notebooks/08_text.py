# ---
# jupyter:
#   jupytext:
#     formats: py:percent,ipynb
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 8. Text: tokenizer, text encoder, contrastive loss, cross-attention
#
# The pieces of a text-conditional model, one cell each, with random weights (the shapes and the mechanics are the
# point; `noisecraft train-clip` trains a real one). The guide's chapter: `docs/tutorials/08-text.md`.

# %%
import torch

from noisecraft.models.attention import Attention
from noisecraft.models.clip import CLIPTextConfig, CLIPTextTransformer, contrastive_loss
from noisecraft.models.tokenizer import CLIPTokenizer

tokenizer = CLIPTokenizer.from_bpe_file()          # CLIP's real BPE vocabulary, bundled
ids = tokenizer(["a dog wearing hat"])
print(tokenizer.tokenize("a dog wearing hat"))
print(ids.shape, ids[0, :8].tolist())

# %% [markdown]
# The text encoder returns one vector per token (SD 1.x: 77×768) and a pooled vector at the end token.

# %%
torch.manual_seed(0)
encoder = CLIPTextTransformer(CLIPTextConfig(width=64, layers=2, heads=4))
tokens, pooled = encoder(ids)
print("per-token:", tuple(tokens.shape), " pooled:", tuple(pooled.shape))

# %% [markdown]
# CLIP's contrastive loss over a batch of (image, text) embeddings: low when matching pairs are the most similar.

# %%
text = torch.randn(8, 32)
matched = contrastive_loss(text + 0.1 * torch.randn(8, 32), text, logit_scale=torch.tensor(2.0))
shuffled = contrastive_loss(torch.randn(8, 32), text, logit_scale=torch.tensor(2.0))
print(f"matched pairs: {matched.item():.3f}   unrelated pairs: {shuffled.item():.3f}   (ln 8 = {torch.log(torch.tensor(8.)).item():.3f})")

# %% [markdown]
# Cross-attention: queries from the image's 8×8 = 64 positions, keys and values from the 77 text tokens.

# %%
image_tokens = torch.randn(1, 64, 32)
attention = Attention(query_dim=32, context_dim=64, heads=4, head_dim=8)
out = attention(image_tokens, context=tokens)
print("image tokens", tuple(image_tokens.shape), "+ text", tuple(tokens.shape), "->", tuple(out.shape))
