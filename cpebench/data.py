"""Data files: the pinned manifest, checksum-verified resolution, and prompt-set loaders.

The evaluation prompts, anchors and training configs are not vendored. Each file
is resolved, in order, from

1. a user-given data directory (``data_dir`` argument / ``--data-dir``, else env
   ``CPEBENCH_DATA``) laid out as the manifest names (``prompts/``, ``anchors/``,
   ``train/``), or as a checkout of Hyun1A/CPE;
2. the user cache (``<cache_dir()>/data/<name>``);
3. a download from the pinned commit of Hyun1A/CPE on raw.githubusercontent.com.

Every file is checked against the sha256 in :data:`DATA_FILES`; a mismatch is
refused. Prompt CSVs are parsed with :mod:`csv` into :class:`PromptRecord`.
"""

from __future__ import annotations

import csv
import hashlib
import os
import re
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from .errors import DataError

__all__ = [
    "PINNED_REPO",
    "PINNED_COMMIT",
    "DEFAULT_BASE_URL",
    "DataFile",
    "DATA_FILES",
    "GatedFile",
    "GATED_FILES",
    "resolve_gated",
    "cache_dir",
    "default_data_dir",
    "data_root",
    "resolve_data_file",
    "fetch",
    "sha256_file",
    "PromptRecord",
    "load_prompt_set",
    "LOADERS",
    "records_from_inline",
]

PINNED_REPO = "Hyun1A/CPE"
PINNED_COMMIT = "4d35d026a261a493f31af664afc3f1ad4a7bc58c"
DEFAULT_BASE_URL = f"https://raw.githubusercontent.com/{PINNED_REPO}/{PINNED_COMMIT}"

DOWNLOAD_TIMEOUT_S = 30
_CHUNK = 1 << 16

_ENV_DATA = "CPEBENCH_DATA"
_ENV_CACHE = "CPEBENCH_CACHE"
_ENV_URL = "CPEBENCH_DATA_URL"
_OFFLINE_ENVS = ("CPEBENCH_OFFLINE", "HF_HUB_OFFLINE")
_TRUTHY = {"1", "true", "yes", "on"}


# --------------------------------------------------------------------------- manifest


@dataclass(frozen=True)
class DataFile:
    """One pinned file: local name, path in its repository (Hyun1A/CPE unless named), size, sha256 and
    provenance."""

    name: str
    source_path: str
    size: int
    sha256: str
    origin: str
    repo: str = PINNED_REPO
    commit: str = PINNED_COMMIT

    @property
    def url(self) -> str:
        """Download URL: for Hyun1A/CPE's files ``CPEBENCH_DATA_URL`` (a mirror) if set, else the pinned raw
        URL; other repositories' files come from their own pinned commit."""
        if self.repo == PINNED_REPO:
            base = os.environ.get(_ENV_URL) or DEFAULT_BASE_URL
        else:
            base = f"https://raw.githubusercontent.com/{self.repo}/{self.commit}"
        return base.rstrip("/") + "/" + urllib.parse.quote(self.source_path)


_NO_LICENCE = "Hyun1A/CPE, no licence stated"
_MACE = "Shilin-LU/MACE, NTU dual licence: non-commercial use only"

_MANIFEST: tuple[DataFile, ...] = (
    DataFile(
        "prompts/I2P_prompts_4703.csv",
        "generation_prompts/I2P_prompts_4703.csv",
        1_376_625,
        "6c1821aeeb20beb276b4e20ce4c4b801f9106dc935bafc9f6fd5e12aa2651e6f",
        "I2P (Schramowski et al., CVPR 2023; HF AIML-TUDA/i2p, lexica.art prompts) in the "
        "ESD/UCE 4703-row copy; dataset card: MIT (via rohitgandikota/erasing, MIT)",
    ),
    DataFile(
        "prompts/celebrity_50_erased.csv",
        "generation_prompts/celebrity_50_erased.csv",
        58_918,
        "cfc2d5fb8a55bbbb71734db1ee5e4557271bb92900e23dd02ebd66370fe67265",
        f"rows 0-1249 of MACE prompts_csv/celebrity_100_concepts.csv ({_MACE})",
    ),
    DataFile(
        "prompts/celebrity_100_remained.csv",
        "generation_prompts/celebrity_100_remained.csv",
        120_354,
        "af4d1b7b48e5c7450c3536ce671b8fba084f2d9c25fe6466d015c6d14e891caf",
        f"rows 2500-4999 of MACE prompts_csv/celebrity_100_concepts.csv ({_MACE})",
    ),
    DataFile(
        "prompts/art_100_erased.csv",
        "generation_prompts/art_100_erased.csv",
        153_125,
        "954a3869e31d4c6bf9aa061e61815bda70313dcd0e105da0c6ba2123d26f797b",
        f"rows 0-2499 of MACE prompts_csv/art_100_concepts.csv ({_MACE})",
    ),
    DataFile(
        "prompts/art_100_remained.csv",
        "generation_prompts/art_100_remained.csv",
        152_036,
        "21adfc812733dc605666ccae7250c0c5dd33fdecdf4b678fc36e66ac880628dd",
        f"rows 2500-4999 of MACE prompts_csv/art_100_concepts.csv ({_MACE})",
    ),
    DataFile(
        "prompts/character_64.csv",
        "generation_prompts/character_64.csv",
        25_975,
        "12d487ab702f0ea5c01e1cb4c3e117b11f79fbe54307a4ca108bea905cb0577f",
        f"64 Word2Vec-neighbour 'characters' x 5 templates, made by the CPE authors ({_NO_LICENCE})",
    ),
    DataFile(
        "prompts/coco_30k.csv",
        "generation_prompts/coco_30k.csv",
        2_413_151,
        "87a3f463164120ca2d1efdbc251f443c7b0043214f767cd1852419d295db9ab5",
        "ESD/UCE COCO-30K selection of MS-COCO captions (captions CC BY 4.0 per COCO terms; "
        "selection file MIT via rohitgandikota/unified-concept-editing)",
    ),
    DataFile(
        "anchors/mass_surr_words_500celebs.csv",
        "anchors/mass_surr_words_500celebs.csv",
        6_939,
        "9bb9c2aa23a80518202fc7357b3e85c5ef1ade531d0de02c48ae63dcf602b62a",
        f"CPE celebrity anchor names, origin not stated ({_NO_LICENCE})",
    ),
    DataFile(
        "anchors/mass_surr_words_actor_general_words.csv",
        "anchors/mass_surr_words_actor_general_words.csv",
        2_180,
        "45c528fcd304e5f262365905d477dc53ce639f45a54d50100c9a5875ac354b32",
        f"CPE generic words for famous people, by the CPE authors ({_NO_LICENCE})",
    ),
    DataFile(
        "anchors/mass_surr_words_artist_general_words.csv",
        "anchors/mass_surr_words_artist_general_words.csv",
        3_333,
        "3d02d62cc48ca3376769a93ac953a783f27ffd17486187cab2ec8ae44eef970e",
        f"CPE generic words for artists, by the CPE authors ({_NO_LICENCE})",
    ),
    DataFile(
        "anchors/mass_surr_words_1734artists.csv",
        "anchors/mass_surr_words_1734artists.csv",
        572_500,
        "7e31b4d01bdef4101d3c7e865e37b3f087459ec00e195059e245d70474b3ca63",
        "UCE data/artists1734_prompts.csv (rohitgandikota/unified-concept-editing, MIT)",
    ),
    DataFile(
        "anchors/mass_surr_prompts_explicit.csv",
        "anchors/mass_surr_prompts_explicit.csv",
        9_543,
        "69d99f5c993310782e2ab4b466101ad5368a87a10b67c54602b9e751f5d46db0",
        f"CPE neutral everyday sentences (explicit anchors), by the CPE authors ({_NO_LICENCE})",
    ),
    DataFile(
        "train/celeb_prompt_templates.csv",
        "configs/train_celeb/prompt_templates.csv",
        5_122,
        "e83c208c828ab0fc54b52f4421ec95e62d9de40e5ef646db6e5bbad46ae4e175",
        f"CPE celebrity training templates (placeholder 'actor'), by the CPE authors ({_NO_LICENCE})",
    ),
    DataFile(
        "train/celeb_targets.yaml",
        "configs/train_celeb/prompt.yaml",
        12_140,
        "0f6e368787ebbfb8ba6a551b44b47b8fb158780ece56e7513e8759fcc1ce5090",
        f"CPE celebrity training targets (prompt.yaml), by the CPE authors ({_NO_LICENCE})",
    ),
    DataFile(
        "train/artist_prompt_templates.csv",
        "configs/train_artist/prompt_templates.csv",
        2_533,
        "314b5618fc91aac1401087f17b9b001a0c1caae2d1e619d0854c1685857529d2",
        f"CPE artist training templates (placeholder 'artist'), by the CPE authors ({_NO_LICENCE})",
    ),
    DataFile(
        "train/artist_targets.yaml",
        "configs/train_artist/prompt.yaml",
        25_434,
        "2e56ffd4e2af8a6eb2215afe35eee7ec63c257e67a8f0cfda755f2c7028391fa",
        f"CPE artist training targets (prompt.yaml; one corrupted name), by the CPE authors ({_NO_LICENCE})",
    ),
    DataFile(
        "train/explicit_prompt_templates.csv",
        "configs/train_explicit/prompt_templates.csv",
        1_435,
        "59bd6a5a9828e80d7f17671ab1109609020d76cb8b6925b98a4c563ba1266f8d",
        f"CPE explicit training templates (placeholder 'explicit'), by the CPE authors ({_NO_LICENCE})",
    ),
    DataFile(
        "train/explicit_targets.yaml",
        "configs/train_explicit/prompt.yaml",
        994,
        "ed9e630210aaf1b2556fde7f61db0f2e5ff858c6974804d74b2d5f36d18272fa",
        f"CPE explicit training targets (prompt.yaml), by the CPE authors ({_NO_LICENCE})",
    ),
    # Attack and object prompt sets (issue 17): each from its own repository at a pinned commit.
    DataFile(
        "attacks/unlearndiffatk/nudity.csv",
        "prompts/nudity.csv",
        45_644,
        "0a40f6e63bca976513d1d56df71480239ba1eb5c7a9de4df2f535d80f6e0eccd",
        "UnlearnDiffAtk (Zhang et al., ECCV 2024), MIT: 142 I2P rows whose SD v1.4 image had an exposed NudeNet class > 0.75",
        "OPTML-Group/Diffusion-MU-Attack",
        "5a3e5d37fb8787113e5d479204ab593a60e303e0",
    ),
    DataFile(
        "attacks/unlearndiffatk/violence.csv",
        "prompts/violence.csv",
        231_980,
        "548c603038d559e71d9b0ecce8aa5867e41869ef948a227fb4be29d4c2bb1b13",
        "UnlearnDiffAtk (Zhang et al., ECCV 2024), MIT: 756 I2P rows labelled violence",
        "OPTML-Group/Diffusion-MU-Attack",
        "5a3e5d37fb8787113e5d479204ab593a60e303e0",
    ),
    DataFile(
        "attacks/unlearndiffatk/illegal.csv",
        "prompts/illegal.csv",
        210_693,
        "2de0690881b50d072f634c77159152ea4fb2d4adbfed1d717f2232c5c68f1100",
        "UnlearnDiffAtk (Zhang et al., ECCV 2024), MIT: 727 I2P rows labelled illegal activity",
        "OPTML-Group/Diffusion-MU-Attack",
        "5a3e5d37fb8787113e5d479204ab593a60e303e0",
    ),
    DataFile(
        "attacks/unlearndiffatk/vangogh.csv",
        "prompts/vangogh.csv",
        3_678,
        "9d0b141b6674b5ef93be5a38c4d220ec56ca1ec096cdfdb5baf0932deca72362",
        "UnlearnDiffAtk (Zhang et al., ECCV 2024), MIT: 50 Van Gogh artwork prompts",
        "OPTML-Group/Diffusion-MU-Attack",
        "5a3e5d37fb8787113e5d479204ab593a60e303e0",
    ),
    DataFile(
        "attacks/unlearndiffatk/church.csv",
        "prompts/church.csv",
        2_226,
        "4987e201148cfa3bd3dabfb67e5681ca09e64155cdadf03b0a0c295269d2c18c",
        "UnlearnDiffAtk (Zhang et al., ECCV 2024), MIT: 50 church prompts with SD-successful seeds",
        "OPTML-Group/Diffusion-MU-Attack",
        "5a3e5d37fb8787113e5d479204ab593a60e303e0",
    ),
    DataFile(
        "attacks/unlearndiffatk/garbage_truck.csv",
        "prompts/garbage_truck.csv",
        2_278,
        "e561240be67ea653bac8dd22bc31d44ae6ccb88268b2e306448eea39feefa6cd",
        "UnlearnDiffAtk (Zhang et al., ECCV 2024), MIT: 50 garbage truck prompts",
        "OPTML-Group/Diffusion-MU-Attack",
        "5a3e5d37fb8787113e5d479204ab593a60e303e0",
    ),
    DataFile(
        "attacks/unlearndiffatk/parachute.csv",
        "prompts/parachute.csv",
        2_351,
        "f44fdef671aecf3f759ef53101e23b5cd614e3da6e2021c3c3d0a1c35a5fe0e5",
        "UnlearnDiffAtk (Zhang et al., ECCV 2024), MIT: 50 parachute prompts",
        "OPTML-Group/Diffusion-MU-Attack",
        "5a3e5d37fb8787113e5d479204ab593a60e303e0",
    ),
    DataFile(
        "attacks/unlearndiffatk/tench.csv",
        "prompts/tench.csv",
        1_978,
        "6d5fc0988e40e7ef97e035031badf52e6a0e971b96be4bf277c2eee3c55f546d",
        "UnlearnDiffAtk (Zhang et al., ECCV 2024), MIT: 50 tench prompts",
        "OPTML-Group/Diffusion-MU-Attack",
        "5a3e5d37fb8787113e5d479204ab593a60e303e0",
    ),
    DataFile(
        "attacks/unlearndiffatk/coco_10k.csv",
        "prompts/coco_10k.csv",
        823_060,
        "3c4eddc1fa5458d685d6ef7175bc8d501d8a9f0a86d17c22b898ce5f3942376e",
        "UnlearnDiffAtk (Zhang et al., ECCV 2024), MIT: COCO-10k captions of the UnlearnDiffAtk leaderboard",
        "OPTML-Group/Diffusion-MU-Attack",
        "5a3e5d37fb8787113e5d479204ab593a60e303e0",
    ),
    DataFile(
        "attacks/ringabell/Violence_eta_5.5_K_38.csv",
        "data/InvPrompt/Violence/Violence_eta_5.5_K_38.csv",
        59_392,
        "d769a433571f7f33b71c7a1b22deb7cc68756f944f2c9dce5924a530ab3ced57",
        "Ring-A-Bell (Tsai et al., ICLR 2024), MIT: violence InvPrompts, eta 5.5, K 38",
        "chiayi-hsu/Ring-A-Bell",
        "e4585ada0a5eb185fbef89bb94147c97f8d2f79a",
    ),
    DataFile(
        "attacks/ringabell/Violence_eta_5.5_K_77.csv",
        "data/InvPrompt/Violence/Violence_eta_5.5_K_77.csv",
        128_548,
        "6a7c8126ff9054d13025c77b5e23531fbbbdfcab73bc424c17a76862d8ac44a1",
        "Ring-A-Bell (Tsai et al., ICLR 2024), MIT: violence InvPrompts, eta 5.5, K 77",
        "chiayi-hsu/Ring-A-Bell",
        "e4585ada0a5eb185fbef89bb94147c97f8d2f79a",
    ),
    DataFile(
        "attacks/ringabell/Violence_eta_5_K_77.csv",
        "data/InvPrompt/Violence/Violence_eta_5_K_77.csv",
        128_448,
        "06ad1bcba205028fa845dfaf2e5cde8bbb8296ee60957844521252bb2edb8a08",
        "Ring-A-Bell (Tsai et al., ICLR 2024), MIT: violence InvPrompts, eta 5, K 77",
        "chiayi-hsu/Ring-A-Bell",
        "e4585ada0a5eb185fbef89bb94147c97f8d2f79a",
    ),
    DataFile(
        "attacks/ringabell/Nudity_vector.npy",
        "Concept Vectors/Nudity_vector.npy",
        236_672,
        "2d08f1c3ca5df914d9f4da2907fb74ea2066f94dd00b58bd1c8a9fb81c0196d7",
        "Ring-A-Bell (Tsai et al., ICLR 2024), MIT: nudity concept vector (77x768, SD v1.4 text encoder)",
        "chiayi-hsu/Ring-A-Bell",
        "e4585ada0a5eb185fbef89bb94147c97f8d2f79a",
    ),
    DataFile(
        "attacks/ringabell/Violence_vector.npy",
        "Concept Vectors/Violence_vector.npy",
        236_672,
        "a97bac99bb75f58b353fa9dbb6673bae7e1e25ad04c2b3125291520be15f26df",
        "Ring-A-Bell (Tsai et al., ICLR 2024), MIT: violence concept vector (77x768)",
        "chiayi-hsu/Ring-A-Bell",
        "e4585ada0a5eb185fbef89bb94147c97f8d2f79a",
    ),
    DataFile(
        "attacks/ringabell/VanGogh_vector.npy",
        "Concept Vectors/VanGogh_vector.npy",
        236_672,
        "5e1c6a6612a515c08d46ed8668469bf20e5e34b636f32f8774a9ccef1160dd27",
        "Ring-A-Bell (Tsai et al., ICLR 2024), MIT: Van Gogh concept vector (1x77x768)",
        "chiayi-hsu/Ring-A-Bell",
        "e4585ada0a5eb185fbef89bb94147c97f8d2f79a",
    ),
    DataFile(
        "attacks/ringabell/Car_vector.npy",
        "Concept Vectors/Car_vector.npy",
        236_672,
        "130c3c16eb2d85ee559d917c1849a5c462419ecc993e0d2de009de8c5a4e7c6f",
        "Ring-A-Bell (Tsai et al., ICLR 2024), MIT: car concept vector (77x768)",
        "chiayi-hsu/Ring-A-Bell",
        "e4585ada0a5eb185fbef89bb94147c97f8d2f79a",
    ),
    DataFile(
        "attacks/ringabell/Nudity_prompt.csv",
        "data/Prompts_For_ConceptVector/Nudity_prompt.csv",
        2_628,
        "62728fa0e3842c1f31cbd7af5bde22e0332e9dfcb310231086c210a95c6d611f",
        "Ring-A-Bell (Tsai et al., ICLR 2024), MIT: 50 nudity phrases for the nudity concept vector",
        "chiayi-hsu/Ring-A-Bell",
        "e4585ada0a5eb185fbef89bb94147c97f8d2f79a",
    ),
    DataFile(
        "attacks/ringabell/NoNudity_prompt.csv",
        "data/Prompts_For_ConceptVector/NoNudity_prompt.csv",
        1_862,
        "6e243245939d430d02fa20eecb9b8ec137a0efb6b85bd4a07c161c5888827556",
        "Ring-A-Bell (Tsai et al., ICLR 2024), MIT: their 50 clothed counterparts",
        "chiayi-hsu/Ring-A-Bell",
        "e4585ada0a5eb185fbef89bb94147c97f8d2f79a",
    ),
    DataFile(
        "attacks/ringabell/Violence_30.csv",
        "data/Prompts_For_ConceptVector/Violence_30.csv",
        4_224,
        "845389ffaf0b0473140d4def0dfcfc5c111c99b91de99922ccf87b6b9fc99dee",
        "Ring-A-Bell (Tsai et al., ICLR 2024), MIT: 30 violence prompt pairs (prompt, prompt1)",
        "chiayi-hsu/Ring-A-Bell",
        "e4585ada0a5eb185fbef89bb94147c97f8d2f79a",
    ),
    DataFile(
        "attacks/sixcd/Nudity.csv",
        "Datasets/SIX-CD/Nudity.csv",
        402_078,
        "df1042ac200a8a54e6a7a6d4d97a429ba2f9a92bf2806e0db59fee869e96b5f1",
        "Six-CD (Ren et al., CVPR 2025), MIT: 1,539 nudity prompts",
        "Artanisax/Six-CD",
        "a30fe9e87c242e6eb57b1e9058aa7be364dc07f5",
    ),
    DataFile(
        "attacks/sixcd/Dual-Version/Nudity/malicious.csv",
        "Datasets/Dual-Version/Nudity/malicious.csv",
        6_057,
        "414badb16cc3a95aef9533e4dce772066b56fd68b468b307fed00179793547c2",
        "Six-CD (Ren et al., CVPR 2025), MIT: 100 explicit prompts of the dual-version pair",
        "Artanisax/Six-CD",
        "a30fe9e87c242e6eb57b1e9058aa7be364dc07f5",
    ),
    DataFile(
        "attacks/sixcd/Dual-Version/Nudity/clean.csv",
        "Datasets/Dual-Version/Nudity/clean.csv",
        4_130,
        "29f3ad515ca83f7e42488599c2f5730d6bbc0c7b4f10e5ff184c7d39ece3b0eb",
        "Six-CD (Ren et al., CVPR 2025), MIT: the same 100 scenes without the sexual content",
        "Artanisax/Six-CD",
        "a30fe9e87c242e6eb57b1e9058aa7be364dc07f5",
    ),
    DataFile(
        "attacks/erasurebenchmark/Nudity_adv_prompts.csv",
        "dataset/adv_prompts/Nudity_adv_prompts.csv",
        167_084,
        "7f8c329913d0777a727461f9343efaedcf4a64440d5ff45c8f4730eddc0f1892",
        "ErasureBenchmark, Apache-2.0: 146 adversarial nudity prompts x 10 seeds",
        "lzws/ErasureBenchmark",
        "ecf321a0835d10e085700f7f0410ad3367fa2224",
    ),
    DataFile(
        "attacks/erasurebenchmark/Horror_adv_prompts.csv",
        "dataset/adv_prompts/Horror_adv_prompts.csv",
        488_238,
        "2a5c3e1afb0d982aa7fbaa28a69a2a5dd67d51841a7c4dab2ecfb30693054a29",
        "ErasureBenchmark, Apache-2.0: 103 adversarial horror prompts x 10 seeds",
        "lzws/ErasureBenchmark",
        "ecf321a0835d10e085700f7f0410ad3367fa2224",
    ),
    DataFile(
        "objects/uce/imagenette.csv",
        "data/imagenette.csv",
        234_872,
        "6f82b5a186f7c44e443052dac15bafe07b4d4e821e7435288642b5756d705b5c",
        "UCE's Imagenette prompts (ESD protocol), MIT: 500 'an image of a <class>' rows per Imagenette class",
        "rohitgandikota/unified-concept-editing",
        "28c81ed5a3e41277c1a0dc55f738e7ab188e9718",
    ),
    DataFile(
        "objects/esd/small_imagenet_prompts.csv",
        "data/small_imagenet_prompts.csv",
        4_222,
        "4ab01d9e98b0a23082b9cdbf52815cc639201fe6ba33b6ed8bbab58984c9fb2d",
        "ESD's small ImageNet prompt set, MIT: 10 rows per Imagenette class (a smoke-test set)",
        "rohitgandikota/erasing",
        "25613d27892326e0c7770f7f3555bea4be150089",
    ),
)

DATA_FILES: dict[str, DataFile] = {f.name: f for f in _MANIFEST}


# --------------------------------------------------------------------------- locations


def _env(name: str) -> str | None:
    value = os.environ.get(name)
    return value if value else None


def cache_dir() -> Path:
    """``$CPEBENCH_CACHE``, else ``$XDG_CACHE_HOME/cpebench``, else ``~/.cache/cpebench``."""
    explicit = _env(_ENV_CACHE)
    if explicit:
        return Path(explicit).expanduser()
    xdg = _env("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "cpebench"
    return Path.home() / ".cache" / "cpebench"


def default_data_dir() -> Path | None:
    """``$CPEBENCH_DATA`` as a path, or None when unset."""
    value = _env(_ENV_DATA)
    return Path(value).expanduser() if value else None


def data_root(data_dir: str | Path | None = None) -> Path | None:
    """The user's data folder: ``data_dir`` (``--data-dir``), else ``$CPEBENCH_DATA``, else None. One
    that does not exist is an error: skipping it would quietly download (or miss) the files instead."""
    if data_dir is not None and str(data_dir) != "":
        root, given_by = Path(data_dir).expanduser(), "--data-dir"
    else:
        root, given_by = default_data_dir(), f"${_ENV_DATA}"
    if root is not None and not root.is_dir():
        raise DataError(f"{given_by} {root}: no such directory")
    return root


def _offline() -> bool:
    return any((os.environ.get(v) or "").strip().lower() in _TRUTHY for v in _OFFLINE_ENVS)


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _lookup(name: str) -> DataFile:
    try:
        return DATA_FILES[name]
    except (KeyError, TypeError):
        known = ", ".join(sorted(DATA_FILES))
        raise DataError(f"unknown data file {name!r}; known names: {known}") from None


def _how_to_provide(df: DataFile) -> str:
    return (
        f"pass --data-dir DIR (or set {_ENV_DATA}=DIR) pointing at a folder that holds "
        f"{df.name}, or run `cpebench data fetch` while online to fill the cache"
    )


# --------------------------------------------------------------------------- resolution


def resolve_data_file(
    name: str,
    data_dir: str | Path | None = None,
    *,
    download: bool = True,
    progress: bool = False,
) -> Path:
    """Return a local, sha256-verified path for the manifest file ``name``.

    Order: ``data_dir`` (else ``$CPEBENCH_DATA``), then the cache, then a download
    into the cache (unless ``download`` is False or offline mode is set).
    """
    df = _lookup(name)

    # (1) user data dir: a present file must match; an absent one falls through.
    root = data_root(data_dir)
    if root is not None:
        # The manifest's layout (prompts/, anchors/, train/) first, then the original Hyun1A/CPE layout (a CPE checkout).
        for candidate in (root / df.name, root / df.source_path):
            if candidate.is_file():
                actual = sha256_file(candidate)
                if actual != df.sha256:
                    raise DataError(
                        f"{candidate}: sha256 mismatch for {df.name}: expected {df.sha256}, "
                        f"got {actual}; the file is not the pinned copy from "
                        f"{df.repo}@{df.commit[:7]}"
                    )
                return candidate

    # (2) user cache: a verified file is never re-downloaded; a bad one is replaced.
    cached = cache_dir() / "data" / df.name
    if cached.is_file():
        if sha256_file(cached) == df.sha256:
            return cached
        try:
            cached.unlink()
        except FileNotFoundError:
            pass

    # (3) download.
    if not download or _offline():
        why = "downloads are disabled" if not download else "offline mode is set (" + ", ".join(
            f"{v}={os.environ.get(v)}" for v in _OFFLINE_ENVS if os.environ.get(v)
        ) + ")"
        where = f"the data dir {root}" if root is not None else "a data dir (none given)"
        raise DataError(
            f"data file {df.name} is in neither {where} nor the cache {cached.parent.parent}, "
            f"and {why}; {_how_to_provide(df)}"
        )
    _download(df, cached, progress=progress)
    return cached


# --------------------------------------------------------------------------- gated sets (never downloaded)


class GatedFileMissing(DataError):
    """No user copy of a gated set (a wrong copy is a plain DataError)."""


@dataclass(frozen=True)
class GatedFile:
    """A prompt set whose owners gate access: cpebench never downloads it. A user's copy is found in the
    data dir under ``name`` (or given by a path), its columns and row count checked, its sha256 recorded."""

    name: str
    request: str                 # where to ask for access
    columns: tuple[str, ...]     # columns a copy must have
    rows: int | None             # data rows a copy must have, when known
    terms: str


GATED_FILES: dict[str, GatedFile] = {g.name: g for g in (
    *(GatedFile(f"attacks/ringabell/Nudity_eta_3_K_{k}.csv",
                "https://huggingface.co/datasets/Chia15/RingABell-Nudity (accept its conditions on the dataset page)",
                ("prompt", "case_number", "evaluation_seed"), 95, "the dataset's gate conditions; repository MIT")
      for k in (16, 38, 77)),
    GatedFile("attacks/mma/mma-diffusion-nsfw-adv-prompts.csv",
              "https://huggingface.co/datasets/YijunYang280/MMA-Diffusion-NSFW-adv-prompts-benchmark (manual approval; "
              "export the train split as CSV)",
              ("target_prompt", "adv_prompt", "sanitized_adv_prompt", "success_against_sanitization_defense",
               "clean_prompt"), 1000, "CC-BY-NC-ND-3.0 (cure-lab/MMA-Diffusion); non-commercial"),
    GatedFile("attacks/p4d/p4dn_16_prompt.csv",
              "https://huggingface.co/datasets/joycenerd/p4d (non-commercial checkbox)",
              ("prompt", "evaluation_seed", "evaluation_guidance", "case_number"), None, "the dataset's gate; repository MIT"),
)}


def resolve_gated(name: str, data_dir: str | Path | None = None, path: str | Path | None = None,
                  where: str = "") -> Path:
    """A user's copy of the gated set ``name``: ``path`` if given, else ``<data dir>/<name>``; checked for
    the expected columns and row count. Missing: one error saying where to request it."""
    g = GATED_FILES[name]
    root = data_root(data_dir)
    candidate = Path(path).expanduser() if path else (root / name if root is not None else None)
    if candidate is None or not candidate.is_file():
        looked = f"{candidate} does not exist" if candidate is not None else "no data dir was given"
        raise GatedFileMissing(
            f"{name} is a gated set that cpebench never downloads ({looked}). Request access at {g.request} "
            f"(terms: {g.terms}); then pass --data-dir DIR with the file at DIR/{name}"
            + (f", or set {where}.path=/your/copy" if where else "")
            + f". Columns it must have: {', '.join(g.columns)}" + (f"; rows: {g.rows}." if g.rows else "."))
    _, rows = _read_csv(candidate, g.columns)
    if g.rows is not None and len(rows) != g.rows:
        raise DataError(f"{candidate}: {len(rows)} data rows, but {name} has {g.rows}; this is not the gated "
                        f"release ({g.request}); refusing to guess")
    return candidate


def _download(df: DataFile, dest: Path, *, progress: bool) -> None:
    url = df.url
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    except OSError as e:
        raise DataError(f"cannot write to the cache folder {dest.parent}: {e}") from e
    tmp = Path(tmp_name)
    try:
        h = hashlib.sha256()
        n = 0
        if progress:
            print(f"cpebench: downloading {df.name} from {url} ...", file=sys.stderr, flush=True)
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
                while True:
                    chunk = resp.read(_CHUNK)
                    if not chunk:
                        break
                    n += len(chunk)
                    if n > df.size:
                        break  # larger than the pinned file: cannot match, stop reading
                    h.update(chunk)
                    out.write(chunk)
        except (urllib.error.URLError, OSError, ValueError) as e:
            reason = getattr(e, "reason", None) or e
            raise DataError(
                f"could not download {df.name} from {url}: {reason}; "
                f"check the network, or {_how_to_provide(df)}"
            ) from e
        actual = h.hexdigest()
        if n != df.size or actual != df.sha256:
            raise DataError(
                f"{url}: sha256 mismatch for {df.name}: expected {df.sha256} ({df.size} bytes), "
                f"got {actual} ({n}{'+' if n > df.size else ''} bytes); nothing was cached"
            )
        os.replace(tmp, dest)
        if progress:
            print(f"cpebench: {df.name}: {n} bytes, sha256 ok -> {dest}", file=sys.stderr, flush=True)
    finally:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass


def fetch(names: Iterable[str], data_dir: str | Path | None = None, progress: bool = True) -> list[Path]:
    """Resolve (downloading where needed) each name; return the verified local paths."""
    if isinstance(names, str):
        names = [names]
    return [resolve_data_file(n, data_dir, download=True, progress=progress) for n in names]


# --------------------------------------------------------------------------- records


@dataclass(frozen=True)
class PromptRecord:
    """One prompt row: id (unique in its set), text, seed, optional per-row CFG."""

    id: str
    prompt: str
    seed: int
    guidance: float | None
    split: str
    concept: str | None
    extras: Mapping[str, Any] = field(default_factory=dict, hash=False, compare=True)

    def to_dict(self) -> dict:
        return {
            "id": self.id,
            "prompt": self.prompt,
            "seed": self.seed,
            "guidance": self.guidance,
            "split": self.split,
            "concept": self.concept,
            "extras": dict(self.extras),
        }


class _Where:
    """Location of a cell, for error messages: file, 1-based data row, row id, column."""

    __slots__ = ("source", "row", "row_id")

    def __init__(self, source: str, row: int, row_id: str | None = None):
        self.source = source
        self.row = row
        self.row_id = row_id

    def at(self, column: str | None = None) -> str:
        s = f"{self.source}: row {self.row}"
        if self.row_id is not None and self.row_id != "":
            s += f" (id {self.row_id!r})"
        if column is not None:
            s += f", column {column!r}"
        return s


def _parse_int(value: Any, where: _Where, column: str, *, lo: int | None = None, hi: int | None = None) -> int:
    if isinstance(value, bool):
        raise DataError(f"{where.at(column)}: expected an integer, got {value!r}")
    if isinstance(value, int):
        out = value
    else:
        text = str(value).strip() if value is not None else ""
        try:
            d = Decimal(text)
        except InvalidOperation:
            raise DataError(f"{where.at(column)}: expected an integer, got {value!r}") from None
        if not d.is_finite() or d != d.to_integral_value():
            raise DataError(f"{where.at(column)}: expected an integer, got {value!r}")
        out = int(d)
    if (lo is not None and out < lo) or (hi is not None and out > hi):
        raise DataError(f"{where.at(column)}: value {out} is outside [{lo}, {hi}]")
    return out


def _parse_seed(value: Any, where: _Where, column: str) -> int:
    # torch.Generator.manual_seed takes a uint64; negative seeds are refused here.
    return _parse_int(value, where, column, lo=0, hi=2**64 - 1)


def _parse_float(value: Any, where: _Where, column: str) -> float:
    if isinstance(value, bool):
        raise DataError(f"{where.at(column)}: expected a number, got {value!r}")
    try:
        out = float(value if isinstance(value, (int, float)) else str(value).strip())
    except (TypeError, ValueError):
        raise DataError(f"{where.at(column)}: expected a number, got {value!r}") from None
    if out != out or out in (float("inf"), float("-inf")):
        raise DataError(f"{where.at(column)}: expected a finite number, got {value!r}")
    return out


def _read_csv(path: Path, required: Iterable[str]) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Read a CSV into (header, [(1-based data row, row dict)]), checking the columns."""
    try:
        f = open(path, encoding="utf-8-sig", newline="")
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from e
    rows: list[tuple[int, dict[str, str]]] = []
    with f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: empty file, no header row")
            missing = [c for c in required if c not in header]
            if missing:
                raise DataError(
                    f"{path}: missing column(s) {', '.join(repr(c) for c in missing)}; "
                    f"columns found: {', '.join(repr(c) for c in header)}"
                )
            n = 0
            for cells in reader:
                if not cells:
                    continue  # a blank line
                n += 1
                if len(cells) != len(header):
                    raise DataError(
                        f"{path}: row {n} (line {reader.line_num}) has {len(cells)} fields, "
                        f"the header has {len(header)}"
                    )
                rows.append((n, dict(zip(header, cells))))
        except csv.Error as e:
            raise DataError(f"{path}: CSV error near line {reader.line_num}: {e}") from e
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not valid UTF-8: {e}") from e
    return header, rows


_CELEB_TEMPLATES = tuple(
    re.compile(p)
    for p in (
        r"A portrait of (?P<c>.+)",
        r"An image capturing (?P<c>.+) at a public event",
        r"An oil painting of (?P<c>.+)",
        r"A sketch of (?P<c>.+)",
        r"(?P<c>.+) in an official photo",
    )
)


def _celebrity_name(prompt: str, where: _Where) -> str:
    for pat in _CELEB_TEMPLATES:
        m = pat.fullmatch(prompt)
        if m and m.group("c").strip():
            return m.group("c").strip()
    raise DataError(
        f"{where.at('prompt')}: prompt {prompt!r} matches none of the 5 celebrity templates "
        "('A portrait of X', 'An image capturing X at a public event', 'An oil painting of X', "
        "'A sketch of X', 'X in an official photo'), so the celebrity name cannot be derived"
    )


# Per format: (id column, required columns, row -> (guidance, concept, extras)).
_RowFn = Callable[[dict, _Where, str], tuple]


def _i2p_row(row: dict[str, str], where: _Where, prompt: str):
    guidance = _parse_float(row["evaluation_guidance"], where, "evaluation_guidance")
    extras: dict[str, Any] = {}
    if "categories" in row:
        extras["categories"] = row["categories"].strip()
    if "hard" in row:
        extras["hard"] = _parse_int(row["hard"], where, "hard")
    for col in ("inappropriate_percentage", "nudity_percentage"):
        if col in row:
            extras[col] = _parse_float(row[col], where, col)
    for col in ("sd_image_width", "sd_image_height"):
        if col in row:
            extras[col] = _parse_int(row[col], where, col, lo=1)
    return guidance, None, extras


def _coco_row(row: dict[str, str], where: _Where, prompt: str):
    return None, None, {"coco_id": _parse_int(row["coco_id"], where, "coco_id", lo=0)}


def _typed_extras(row: dict[str, str]) -> dict[str, Any]:
    return {"type": row["type"].strip()} if "type" in row else {}


def _celebrity_row(row: dict[str, str], where: _Where, prompt: str):
    return None, _celebrity_name(prompt, where), _typed_extras(row)


def _artist_row(row: dict[str, str], where: _Where, prompt: str):
    artist = row["artist"].strip()
    if not artist:
        raise DataError(f"{where.at('artist')}: empty artist name")
    return None, artist, _typed_extras(row)


def _character_row(row: dict[str, str], where: _Where, prompt: str):
    pre = row["pre"].strip()
    if not pre:
        raise DataError(f"{where.at('pre')}: empty character word")
    return None, pre, {"target": row["target"].strip(), "sim": _parse_float(row["sim"], where, "sim")}


def _attack_row(row: dict[str, str], where: _Where, prompt: str):
    """An attack set's row: CFG from ``evaluation_guidance`` when the file has it (else the protocol's)."""
    guidance = _parse_float(row["evaluation_guidance"], where, "evaluation_guidance") if row.get("evaluation_guidance") else None
    extras = {k: row[k].strip() for k in ("categories", "target_prompt", "clean_prompt") if k in row}
    return guidance, None, extras


def _object_row(row: dict[str, str], where: _Where, prompt: str):
    cls = row["class"].strip()
    if not cls:
        raise DataError(f"{where.at('class')}: empty class name")
    return None, cls, {}


def _coco10k_row(row: dict[str, str], where: _Where, prompt: str):
    return None, None, {"coco_id": _parse_int(row["case_number"], where, "case_number", lo=0)}


def _style_row(row: dict[str, str], where: _Where, prompt: str):
    guidance, _, extras = _attack_row(row, where, prompt)
    return guidance, _artist_row(row, where, prompt)[1], extras


_FORMATS: dict[str, tuple[str | None, tuple[str, ...], _RowFn]] = {
    "i2p": ("case_number", ("case_number", "prompt", "evaluation_seed", "evaluation_guidance"), _i2p_row),
    "coco": ("case_number", ("case_number", "prompt", "evaluation_seed", "coco_id"), _coco_row),
    "celebrity": ("", ("", "prompt", "evaluation_seed"), _celebrity_row),
    "artist": ("", ("", "artist", "prompt", "evaluation_seed"), _artist_row),
    "character": ("", ("", "pre", "target", "sim", "prompt", "evaluation_seed"), _character_row),
    # attack and object sets (issue 17)
    "attack": ("case_number", ("case_number", "prompt", "evaluation_seed"), _attack_row),   # Ring-A-Bell, Six-CD, P4D
    "erasurebench": ("case_number", ("case_number", "prompt", "seed"), _attack_row),       # ErasureBenchmark
    "style_attack": ("Unnamed: 0", ("Unnamed: 0", "prompt", "evaluation_seed", "artist"), _style_row),  # UnlearnDiffAtk
    "objects": ("case_number", ("case_number", "prompt", "evaluation_seed", "class"), _object_row),    # Imagenette
    "coco10k": ("case_number", ("case_number", "prompt", "evaluation_seed"), _coco10k_row),
    "mma": (None, ("adv_prompt",), _attack_row),          # MMA-Diffusion: no id, no seed column
}
_PROMPT_COLUMN = {"mma": "adv_prompt"}
_SEED_COLUMN = {"erasurebench": "seed"}
FIXED_SEEDS = {"mma": 42}      # a set without seeds: SAFREE's seed for every MMA-Diffusion row


def _finish(records: list[PromptRecord], *, dedupe: bool, limit: int | None, source: str,
            rows: list[int]) -> list[PromptRecord]:
    """Dedupe by prompt text, refuse duplicate ids, apply the limit."""
    out: list[PromptRecord] = []
    seen_prompts: set[str] = set()
    seen_ids: dict[str, int] = {}
    for rec, n in zip(records, rows):
        if dedupe:
            if rec.prompt in seen_prompts:
                continue
            seen_prompts.add(rec.prompt)
        if rec.id in seen_ids:
            raise DataError(
                f"{source}: row {n} (id {rec.id!r}), column 'id': duplicate row id, "
                f"first used on row {seen_ids[rec.id]}"
            )
        seen_ids[rec.id] = n
        out.append(rec)
    if limit is not None:
        out = out[:limit]
    return out


def _check_limit(limit: int | None, source: str) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise DataError(f"{source}: limit must be a non-negative integer or None, got {limit!r}")


def _make_loader(fmt: str) -> Callable[..., list[PromptRecord]]:
    id_col, required, row_fn = _FORMATS[fmt]

    def loader(
        path: str | Path,
        *,
        split: str,
        drop_empty: bool = False,
        dedupe: bool = False,
        limit: int | None = None,
    ) -> list[PromptRecord]:
        path = Path(path)
        source = str(path)
        _check_limit(limit, source)
        _, rows = _read_csv(path, required)
        records: list[PromptRecord] = []
        numbers: list[int] = []
        prompt_col, seed_col = _PROMPT_COLUMN.get(fmt, "prompt"), _SEED_COLUMN.get(fmt, "evaluation_seed")
        for n, row in rows:
            rid = str(n - 1) if id_col is None else row[id_col].strip()     # no id column: the 0-based row
            where = _Where(source, n, rid)
            if not rid:
                raise DataError(f"{where.at(id_col)}: empty row id")
            prompt = row[prompt_col].strip()
            if not prompt:
                if drop_empty:
                    continue
                raise DataError(f"{where.at(prompt_col)}: empty prompt (load with drop_empty=True to skip such rows)")
            seed = FIXED_SEEDS[fmt] if fmt in FIXED_SEEDS else _parse_seed(row[seed_col], where, seed_col)
            guidance, concept, extras = row_fn(row, where, prompt)
            records.append(PromptRecord(rid, prompt, seed, guidance, split, concept, extras))
            numbers.append(n)
        return _finish(records, dedupe=dedupe, limit=limit, source=source, rows=numbers)

    loader.__name__ = f"load_{fmt}"
    loader.__qualname__ = loader.__name__
    loader.__doc__ = (
        f"Load a {fmt!r} prompt CSV (required columns: {', '.join(repr(c) for c in required)}; "
        f"row id column {id_col!r})." if id_col is not None else
        f"Load a {fmt!r} prompt CSV (required columns: {', '.join(repr(c) for c in required)}; rows numbered from 0)."
    )
    return loader


LOADERS: dict[str, Callable[..., list[PromptRecord]]] = {fmt: _make_loader(fmt) for fmt in _FORMATS}


def load_prompt_set(
    path: str | Path,
    format: str,
    *,
    split: str,
    drop_empty: bool = False,
    dedupe: bool = False,
    limit: int | None = None,
) -> list[PromptRecord]:
    """Parse a prompt CSV of the given format into records (see :data:`LOADERS`)."""
    loader = LOADERS.get(format) if isinstance(format, str) else None
    if loader is None:
        raise DataError(
            f"{path}: unknown prompt-set format {format!r}; known formats: {', '.join(sorted(LOADERS))}"
        )
    return loader(path, split=split, drop_empty=drop_empty, dedupe=dedupe, limit=limit)


_INLINE_KEYS = ("id", "prompt", "seed", "guidance", "concept")


def records_from_inline(rows: list[dict], *, split: str, source: str) -> list[PromptRecord]:
    """Records from a YAML-inlined prompt list.

    Each item is a mapping with ``prompt`` and ``seed`` (required), and optionally
    ``id`` (default: the 0-based position), ``guidance``, ``concept``; any other
    key goes to ``extras``. ``source`` names the YAML file in error messages.
    """
    if not isinstance(rows, (list, tuple)):
        raise DataError(f"{source}: the prompt list must be a list of mappings, got {type(rows).__name__}")
    records: list[PromptRecord] = []
    numbers: list[int] = []
    for i, row in enumerate(rows):
        n = i + 1
        if not isinstance(row, Mapping):
            raise DataError(f"{source}: row {n}: expected a mapping with 'prompt' and 'seed', got {row!r}")
        raw_id = row.get("id")
        rid = str(i) if raw_id is None else str(raw_id).strip()
        where = _Where(source, n, rid)
        if not rid:
            raise DataError(f"{where.at('id')}: empty row id")
        for key in ("prompt", "seed"):
            if key not in row:
                raise DataError(f"{where.at(key)}: missing required key {key!r}; keys found: {sorted(map(str, row))}")
        if not isinstance(row["prompt"], str):
            raise DataError(f"{where.at('prompt')}: expected a string, got {row['prompt']!r}")
        prompt = row["prompt"].strip()
        if not prompt:
            raise DataError(f"{where.at('prompt')}: empty prompt")
        seed = _parse_seed(row["seed"], where, "seed")
        guidance = None if row.get("guidance") is None else _parse_float(row["guidance"], where, "guidance")
        concept = row.get("concept")
        if concept is not None:
            if not isinstance(concept, str):
                raise DataError(f"{where.at('concept')}: expected a string, got {concept!r}")
            concept = concept.strip() or None
        extras = {str(k): v for k, v in row.items() if k not in _INLINE_KEYS}
        records.append(PromptRecord(rid, prompt, seed, guidance, split, concept, extras))
        numbers.append(n)
    return _finish(records, dedupe=False, limit=None, source=source, rows=numbers)
