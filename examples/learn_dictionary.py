"""Learn a convolutional dictionary from scikit-learn's two photographs and save the atoms as a figure.

    python examples/learn_dictionary.py [OUT.png]
"""
import sys

import torch
from tqdm import tqdm

from dsc_kernels.dictionary_learning import highpass, learn_conv_dictionary, plot_atoms
from dsc_kernels.recipes import data

generator = torch.Generator().manual_seed(0)
x = torch.cat([data.random_patches(data.photo(name), 8, 48, generator) for name in data.PHOTOS])
detail, _ = highpass(x)  # CDL models the detail; the smooth part is kept aside
detail = detail / detail.std()
with tqdm(total=80, desc="CDL") as bar:
    result = learn_conv_dictionary(detail, 36, 8, 0.2, n_outer=80, n_code_iter=5, n_dict_iter=5,
                                   callback=lambda i, value: (bar.update(1), bar.set_postfix(objective=f"{value:.4f}")))
print(f"objective {result.objective[0]:.4f} -> {result.objective[-1]:.4f}; "
      f"{float((result.codes == 0).float().mean()):.1%} of the codes are exactly zero")
plot_atoms(result.weight, sys.argv[1] if len(sys.argv) > 1 else "cdl_atoms.png",
           title="36 atoms 8x8 learned from china.jpg + flower.jpg (high-passed)")
