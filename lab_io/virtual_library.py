"""A combinatorial virtual library enumerated with RDKit reactions from building blocks kept here.

Four schemes (all common medicinal-chemistry couplings), over real, purchasable reagents:

==============  =========================================================  ==================
scheme          products                                                   combinations
==============  =========================================================  ==================
amide           carboxylic acid + amine                                    acids x amines
sulfonamide     sulfonyl chloride + amine                                  sulfonyls x amines
amide3          acid + amino-acid linker + amine (two amide couplings)     acids x linkers x amines
suzuki_amide    bromo(hetero)aryl acid + boronic acid (Suzuki), then amine bromo x boronic x amines
==============  =========================================================  ==================

Every building block matches its reaction template exactly once (checked by the tests), so each
combination gives exactly one product. ``enumerate_library(n, seed)`` walks a seeded permutation of
all combinations, so the first ``n`` products for a seed are a prefix of the first ``n + k``.
Names are ``<scheme>:<block>+<block>[+<block>]``, ids ``VL-000001``...
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from rdkit import Chem, rdBase
from rdkit.Chem import rdChemReactions

log = logging.getLogger(__name__)

ID_PREFIX = "VL-"

# --------------------------------------------------------------------------------------------
# Reaction templates
# --------------------------------------------------------------------------------------------

ACID_SMARTS = "[CX3:1](=[O:2])[OX2H1]"
# Primary or secondary amine (aliphatic or aniline); not an amide/sulfonamide/urea/amidine N,
# not N-N / N-O.
AMINE_SMARTS = "[NX3;H2,H1;!$(N[#6,#16,#15]=[#7,#8,#16]);!$(N[#7,#8]):3]"
SULFONYL_CHLORIDE_SMARTS = "[SX4:1](=[O:2])(=[O:3])[Cl]"
ARYL_BROMIDE_SMARTS = "[c:1][Br]"
BORONIC_ACID_SMARTS = "[c:2][BX3]([OH1])[OH1]"

AMIDE_COUPLING = f"{ACID_SMARTS}.{AMINE_SMARTS}>>[C:1](=[O:2])[N:3]"
SULFONAMIDE_FORMATION = f"{SULFONYL_CHLORIDE_SMARTS}.{AMINE_SMARTS.replace(':3]', ':4]')}>>[S:1](=[O:2])(=[O:3])[N:4]"
SUZUKI_COUPLING = f"{ARYL_BROMIDE_SMARTS}.{BORONIC_ACID_SMARTS}>>[c:1]-[c:2]"

# --------------------------------------------------------------------------------------------
# Building blocks: (name, SMILES)
# --------------------------------------------------------------------------------------------

ACIDS: tuple[tuple[str, str], ...] = (
    ("benzoic_acid", "OC(=O)c1ccccc1"),
    ("4-fluorobenzoic_acid", "OC(=O)c1ccc(F)cc1"),
    ("3-fluorobenzoic_acid", "OC(=O)c1cccc(F)c1"),
    ("2-fluorobenzoic_acid", "OC(=O)c1ccccc1F"),
    ("4-chlorobenzoic_acid", "OC(=O)c1ccc(Cl)cc1"),
    ("3-chlorobenzoic_acid", "OC(=O)c1cccc(Cl)c1"),
    ("3,4-dichlorobenzoic_acid", "OC(=O)c1ccc(Cl)c(Cl)c1"),
    ("4-methoxybenzoic_acid", "OC(=O)c1ccc(OC)cc1"),
    ("3-methoxybenzoic_acid", "OC(=O)c1cccc(OC)c1"),
    ("3,4-dimethoxybenzoic_acid", "OC(=O)c1ccc(OC)c(OC)c1"),
    ("3,4,5-trimethoxybenzoic_acid", "OC(=O)c1cc(OC)c(OC)c(OC)c1"),
    ("4-methylbenzoic_acid", "OC(=O)c1ccc(C)cc1"),
    ("4-(trifluoromethyl)benzoic_acid", "OC(=O)c1ccc(C(F)(F)F)cc1"),
    ("3-(trifluoromethyl)benzoic_acid", "OC(=O)c1cccc(C(F)(F)F)c1"),
    ("4-cyanobenzoic_acid", "OC(=O)c1ccc(C#N)cc1"),
    ("3-cyanobenzoic_acid", "OC(=O)c1cccc(C#N)c1"),
    ("4-(methylsulfonyl)benzoic_acid", "OC(=O)c1ccc(S(C)(=O)=O)cc1"),
    ("4-acetylbenzoic_acid", "OC(=O)c1ccc(C(C)=O)cc1"),
    ("4-(dimethylamino)benzoic_acid", "OC(=O)c1ccc(N(C)C)cc1"),
    ("4-hydroxybenzoic_acid", "OC(=O)c1ccc(O)cc1"),
    ("4-tert-butylbenzoic_acid", "OC(=O)c1ccc(C(C)(C)C)cc1"),
    ("4-(trifluoromethoxy)benzoic_acid", "OC(=O)c1ccc(OC(F)(F)F)cc1"),
    ("2-naphthoic_acid", "OC(=O)c1ccc2ccccc2c1"),
    ("1-naphthoic_acid", "OC(=O)c1cccc2ccccc12"),
    ("nicotinic_acid", "OC(=O)c1cccnc1"),
    ("isonicotinic_acid", "OC(=O)c1ccncc1"),
    ("picolinic_acid", "OC(=O)c1ccccn1"),
    ("6-methylnicotinic_acid", "OC(=O)c1ccc(C)nc1"),
    ("6-chloronicotinic_acid", "OC(=O)c1ccc(Cl)nc1"),
    ("2-methoxyisonicotinic_acid", "OC(=O)c1ccnc(OC)c1"),
    ("pyrazine-2-carboxylic_acid", "OC(=O)c1cnccn1"),
    ("pyrimidine-5-carboxylic_acid", "OC(=O)c1cncnc1"),
    ("thiophene-2-carboxylic_acid", "OC(=O)c1cccs1"),
    ("thiophene-3-carboxylic_acid", "OC(=O)c1ccsc1"),
    ("5-methylthiophene-2-carboxylic_acid", "OC(=O)c1ccc(C)s1"),
    ("2-furoic_acid", "OC(=O)c1ccco1"),
    ("3-furoic_acid", "OC(=O)c1ccoc1"),
    ("thiazole-4-carboxylic_acid", "OC(=O)c1cscn1"),
    ("2-methylthiazole-4-carboxylic_acid", "OC(=O)c1csc(C)n1"),
    ("5-methylisoxazole-3-carboxylic_acid", "OC(=O)c1cc(C)on1"),
    ("1-methylpyrazole-4-carboxylic_acid", "OC(=O)c1cnn(C)c1"),
    ("1-methylpyrrole-2-carboxylic_acid", "OC(=O)c1cccn1C"),
    ("indole-2-carboxylic_acid", "OC(=O)c1cc2ccccc2[nH]1"),
    ("indole-3-carboxylic_acid", "OC(=O)c1c[nH]c2ccccc12"),
    ("indole-5-carboxylic_acid", "OC(=O)c1ccc2[nH]ccc2c1"),
    ("benzofuran-2-carboxylic_acid", "OC(=O)c1cc2ccccc2o1"),
    ("benzothiophene-2-carboxylic_acid", "OC(=O)c1cc2ccccc2s1"),
    ("quinoline-3-carboxylic_acid", "OC(=O)c1cnc2ccccc2c1"),
    ("quinoline-6-carboxylic_acid", "OC(=O)c1ccc2ncccc2c1"),
    ("piperonylic_acid", "OC(=O)c1ccc2OCOc2c1"),
    ("cyclopropanecarboxylic_acid", "OC(=O)C1CC1"),
    ("cyclobutanecarboxylic_acid", "OC(=O)C1CCC1"),
    ("cyclopentanecarboxylic_acid", "OC(=O)C1CCCC1"),
    ("cyclohexanecarboxylic_acid", "OC(=O)C1CCCCC1"),
    ("adamantane-1-carboxylic_acid", "OC(=O)C12CC3CC(CC(C3)C1)C2"),
    ("phenylacetic_acid", "OC(=O)Cc1ccccc1"),
    ("4-fluorophenylacetic_acid", "OC(=O)Cc1ccc(F)cc1"),
    ("4-methoxyphenylacetic_acid", "OC(=O)Cc1ccc(OC)cc1"),
    ("3-phenylpropanoic_acid", "OC(=O)CCc1ccccc1"),
    ("phenoxyacetic_acid", "OC(=O)COc1ccccc1"),
    ("thiophen-2-ylacetic_acid", "OC(=O)Cc1cccs1"),
    ("tetrahydropyran-4-carboxylic_acid", "OC(=O)C1CCOCC1"),
    ("tetrahydrofuran-2-carboxylic_acid", "OC(=O)C1CCCO1"),
    ("pivalic_acid", "OC(=O)C(C)(C)C"),
    ("3,3-dimethylbutanoic_acid", "OC(=O)CC(C)(C)C"),
    ("trans-cinnamic_acid", "OC(=O)/C=C/c1ccccc1"),
    ("1-acetylpiperidine-4-carboxylic_acid", "CC(=O)N1CCC(C(=O)O)CC1"),
)

AMINES: tuple[tuple[str, str], ...] = (
    ("morpholine", "C1COCCN1"),
    ("piperidine", "C1CCNCC1"),
    ("pyrrolidine", "C1CCNC1"),
    ("azetidine", "C1CNC1"),
    ("azepane", "C1CCCNCC1"),
    ("thiomorpholine", "C1CSCCN1"),
    ("1-methylpiperazine", "CN1CCNCC1"),
    ("1-phenylpiperazine", "C1CN(CCN1)c1ccccc1"),
    ("1-(4-fluorophenyl)piperazine", "Fc1ccc(cc1)N1CCNCC1"),
    ("1-(2-pyridyl)piperazine", "C1CN(CCN1)c1ccccn1"),
    ("1-(4-pyridyl)piperazine", "C1CN(CCN1)c1ccncc1"),
    ("1-(2-pyrimidinyl)piperazine", "C1CN(CCN1)c1ncccn1"),
    ("1-acetylpiperazine", "CC(=O)N1CCNCC1"),
    ("1-boc-piperazine", "CC(C)(C)OC(=O)N1CCNCC1"),
    ("1-cyclopropylpiperazine", "C1CN(CCN1)C1CC1"),
    ("4-methylpiperidine", "CC1CCNCC1"),
    ("4-hydroxypiperidine", "OC1CCNCC1"),
    ("4-phenylpiperidine", "C1CC(CCN1)c1ccccc1"),
    ("4-benzylpiperidine", "C1CC(CCN1)Cc1ccccc1"),
    ("3,3-difluoropyrrolidine", "FC1(F)CCNC1"),
    ("4,4-difluoropiperidine", "FC1(F)CCNCC1"),
    ("1,2,3,4-tetrahydroisoquinoline", "C1Cc2ccccc2CN1"),
    ("indoline", "C1Cc2ccccc2N1"),
    ("N-methylbenzylamine", "CNCc1ccccc1"),
    ("N-methylaniline", "CNc1ccccc1"),
    ("benzylamine", "NCc1ccccc1"),
    ("4-fluorobenzylamine", "NCc1ccc(F)cc1"),
    ("4-chlorobenzylamine", "NCc1ccc(Cl)cc1"),
    ("4-methoxybenzylamine", "COc1ccc(CN)cc1"),
    ("4-(trifluoromethyl)benzylamine", "NCc1ccc(C(F)(F)F)cc1"),
    ("piperonylamine", "NCc1ccc2OCOc2c1"),
    ("1-phenylethylamine", "CC(N)c1ccccc1"),
    ("2-phenylethylamine", "NCCc1ccccc1"),
    ("2-(4-methoxyphenyl)ethylamine", "COc1ccc(CCN)cc1"),
    ("tryptamine", "NCCc1c[nH]c2ccccc12"),
    ("3-picolylamine", "NCc1cccnc1"),
    ("2-picolylamine", "NCc1ccccn1"),
    ("furfurylamine", "NCc1ccco1"),
    ("2-thenylamine", "NCc1cccs1"),
    ("cyclopropylamine", "NC1CC1"),
    ("cyclobutylamine", "NC1CCC1"),
    ("cyclopentylamine", "NC1CCCC1"),
    ("cyclohexylamine", "NC1CCCCC1"),
    ("tetrahydropyran-4-amine", "NC1CCOCC1"),
    ("1-methylpiperidin-4-amine", "CN1CCC(N)CC1"),
    ("2-methoxyethylamine", "COCCN"),
    ("3-methoxypropylamine", "COCCCN"),
    ("2-morpholinoethylamine", "NCCN1CCOCC1"),
    ("3-morpholinopropylamine", "NCCCN1CCOCC1"),
    ("N,N-dimethylethylenediamine", "CN(C)CCN"),
    ("isopropylamine", "CC(C)N"),
    ("tert-butylamine", "CC(C)(C)N"),
    ("aniline", "Nc1ccccc1"),
    ("4-fluoroaniline", "Nc1ccc(F)cc1"),
    ("3-chloroaniline", "Nc1cccc(Cl)c1"),
    ("p-anisidine", "COc1ccc(N)cc1"),
    ("3,4-dimethoxyaniline", "COc1ccc(N)cc1OC"),
    ("o-toluidine", "Cc1ccccc1N"),
    ("3-(trifluoromethyl)aniline", "Nc1cccc(C(F)(F)F)c1"),
    ("4-aminobenzonitrile", "Nc1ccc(C#N)cc1"),
    ("4-morpholinoaniline", "Nc1ccc(cc1)N1CCOCC1"),
    ("4-(4-methylpiperazin-1-yl)aniline", "CN1CCN(CC1)c1ccc(N)cc1"),
    ("3-aminopyridine", "Nc1cccnc1"),
    ("2-aminopyridine", "Nc1ccccn1"),
    ("2-aminothiazole", "Nc1nccs1"),
    ("2-aminobenzothiazole", "Nc1nc2ccccc2s1"),
    ("3-amino-5-methylisoxazole", "Cc1cc(N)no1"),
    ("1-methylpyrazol-4-amine", "Cn1cc(N)cn1"),
    ("3-aminoquinoline", "Nc1cnc2ccccc2c1"),
)

SULFONYL_CHLORIDES: tuple[tuple[str, str], ...] = (
    ("benzenesulfonyl_chloride", "ClS(=O)(=O)c1ccccc1"),
    ("tosyl_chloride", "Cc1ccc(cc1)S(Cl)(=O)=O"),
    ("4-fluorobenzenesulfonyl_chloride", "Fc1ccc(cc1)S(Cl)(=O)=O"),
    ("4-chlorobenzenesulfonyl_chloride", "Clc1ccc(cc1)S(Cl)(=O)=O"),
    ("3-chlorobenzenesulfonyl_chloride", "Clc1cccc(c1)S(Cl)(=O)=O"),
    ("4-methoxybenzenesulfonyl_chloride", "COc1ccc(cc1)S(Cl)(=O)=O"),
    ("4-(trifluoromethyl)benzenesulfonyl_chloride", "FC(F)(F)c1ccc(cc1)S(Cl)(=O)=O"),
    ("3-(trifluoromethyl)benzenesulfonyl_chloride", "FC(F)(F)c1cccc(c1)S(Cl)(=O)=O"),
    ("4-cyanobenzenesulfonyl_chloride", "N#Cc1ccc(cc1)S(Cl)(=O)=O"),
    ("4-acetamidobenzenesulfonyl_chloride", "CC(=O)Nc1ccc(cc1)S(Cl)(=O)=O"),
    ("4-tert-butylbenzenesulfonyl_chloride", "CC(C)(C)c1ccc(cc1)S(Cl)(=O)=O"),
    ("2,4-difluorobenzenesulfonyl_chloride", "Fc1ccc(c(F)c1)S(Cl)(=O)=O"),
    ("4-(methylsulfonyl)benzenesulfonyl_chloride", "CS(=O)(=O)c1ccc(cc1)S(Cl)(=O)=O"),
    ("2-naphthalenesulfonyl_chloride", "ClS(=O)(=O)c1ccc2ccccc2c1"),
    ("quinoline-8-sulfonyl_chloride", "ClS(=O)(=O)c1cccc2cccnc12"),
    ("thiophene-2-sulfonyl_chloride", "ClS(=O)(=O)c1cccs1"),
    ("pyridine-3-sulfonyl_chloride", "ClS(=O)(=O)c1cccnc1"),
    ("1-methylimidazole-4-sulfonyl_chloride", "Cn1cnc(c1)S(Cl)(=O)=O"),
    ("1-methylpyrazole-4-sulfonyl_chloride", "Cn1cc(cn1)S(Cl)(=O)=O"),
    ("3,5-dimethylisoxazole-4-sulfonyl_chloride", "Cc1noc(C)c1S(Cl)(=O)=O"),
    ("methanesulfonyl_chloride", "CS(Cl)(=O)=O"),
    ("ethanesulfonyl_chloride", "CCS(Cl)(=O)=O"),
    ("cyclopropanesulfonyl_chloride", "ClS(=O)(=O)C1CC1"),
    ("phenylmethanesulfonyl_chloride", "ClS(=O)(=O)Cc1ccccc1"),
)

# Amino acids: one carboxylic acid, one primary/secondary amine.
LINKERS: tuple[tuple[str, str], ...] = (
    ("glycine", "NCC(=O)O"),
    ("beta-alanine", "NCCC(=O)O"),
    ("GABA", "NCCCC(=O)O"),
    ("sarcosine", "CNCC(=O)O"),
    ("L-alanine", "C[C@H](N)C(=O)O"),
    ("L-valine", "CC(C)[C@H](N)C(=O)O"),
    ("L-leucine", "CC(C)C[C@H](N)C(=O)O"),
    ("L-phenylalanine", "N[C@@H](Cc1ccccc1)C(=O)O"),
    ("L-proline", "OC(=O)[C@@H]1CCCN1"),
    ("isonipecotic_acid", "OC(=O)C1CCNCC1"),
    ("nipecotic_acid", "OC(=O)C1CCCNC1"),
    ("azetidine-3-carboxylic_acid", "OC(=O)C1CNC1"),
    ("pyrrolidine-3-carboxylic_acid", "OC(=O)C1CCNC1"),
    ("morpholine-2-carboxylic_acid", "OC(=O)C1CNCCO1"),
    ("1-aminocyclopropanecarboxylic_acid", "NC1(CC1)C(=O)O"),
    ("4-aminotetrahydropyran-4-carboxylic_acid", "NC1(CCOCC1)C(=O)O"),
    ("4-aminocyclohexanecarboxylic_acid", "NC1CCC(CC1)C(=O)O"),
    ("4-aminobenzoic_acid", "Nc1ccc(cc1)C(=O)O"),
    ("3-aminobenzoic_acid", "Nc1cccc(c1)C(=O)O"),
    ("4-(aminomethyl)benzoic_acid", "NCc1ccc(cc1)C(=O)O"),
    ("3-(aminomethyl)benzoic_acid", "NCc1cccc(c1)C(=O)O"),
    ("4-aminophenylacetic_acid", "Nc1ccc(CC(=O)O)cc1"),
    ("6-aminonicotinic_acid", "Nc1ccc(cn1)C(=O)O"),
    ("2-aminothiazole-4-carboxylic_acid", "Nc1nc(cs1)C(=O)O"),
)

BROMOARYL_ACIDS: tuple[tuple[str, str], ...] = (
    ("4-bromobenzoic_acid", "OC(=O)c1ccc(Br)cc1"),
    ("3-bromobenzoic_acid", "OC(=O)c1cccc(Br)c1"),
    ("4-bromo-2-fluorobenzoic_acid", "OC(=O)c1ccc(Br)cc1F"),
    ("4-bromo-3-methylbenzoic_acid", "OC(=O)c1ccc(Br)c(C)c1"),
    ("3-bromo-4-methoxybenzoic_acid", "OC(=O)c1ccc(OC)c(Br)c1"),
    ("4-bromophenylacetic_acid", "OC(=O)Cc1ccc(Br)cc1"),
    ("5-bromonicotinic_acid", "OC(=O)c1cncc(Br)c1"),
    ("6-bromonicotinic_acid", "OC(=O)c1ccc(Br)nc1"),
    ("5-bromopicolinic_acid", "OC(=O)c1ccc(Br)cn1"),
    ("5-bromothiophene-2-carboxylic_acid", "OC(=O)c1ccc(Br)s1"),
    ("5-bromo-2-furoic_acid", "OC(=O)c1ccc(Br)o1"),
    ("2-bromothiazole-4-carboxylic_acid", "OC(=O)c1csc(Br)n1"),
    ("5-bromoindole-2-carboxylic_acid", "OC(=O)c1cc2cc(Br)ccc2[nH]1"),
)

BORONIC_ACIDS: tuple[tuple[str, str], ...] = (
    ("phenylboronic_acid", "OB(O)c1ccccc1"),
    ("4-fluorophenylboronic_acid", "OB(O)c1ccc(F)cc1"),
    ("3,4-difluorophenylboronic_acid", "OB(O)c1ccc(F)c(F)c1"),
    ("4-chlorophenylboronic_acid", "OB(O)c1ccc(Cl)cc1"),
    ("3-chlorophenylboronic_acid", "OB(O)c1cccc(Cl)c1"),
    ("4-methoxyphenylboronic_acid", "COc1ccc(cc1)B(O)O"),
    ("3-methoxyphenylboronic_acid", "COc1cccc(c1)B(O)O"),
    ("4-methylphenylboronic_acid", "Cc1ccc(cc1)B(O)O"),
    ("2-methylphenylboronic_acid", "Cc1ccccc1B(O)O"),
    ("4-(trifluoromethyl)phenylboronic_acid", "OB(O)c1ccc(C(F)(F)F)cc1"),
    ("3-cyanophenylboronic_acid", "OB(O)c1cccc(C#N)c1"),
    ("4-cyanophenylboronic_acid", "OB(O)c1ccc(C#N)cc1"),
    ("4-hydroxyphenylboronic_acid", "OB(O)c1ccc(O)cc1"),
    ("4-(methylsulfonyl)phenylboronic_acid", "CS(=O)(=O)c1ccc(cc1)B(O)O"),
    ("1,3-benzodioxol-5-ylboronic_acid", "OB(O)c1ccc2OCOc2c1"),
    ("2-naphthylboronic_acid", "OB(O)c1ccc2ccccc2c1"),
    ("benzofuran-2-ylboronic_acid", "OB(O)c1cc2ccccc2o1"),
    ("pyridin-3-ylboronic_acid", "OB(O)c1cccnc1"),
    ("pyridin-4-ylboronic_acid", "OB(O)c1ccncc1"),
    ("6-methoxypyridin-3-ylboronic_acid", "COc1ccc(cn1)B(O)O"),
    ("pyrimidin-5-ylboronic_acid", "OB(O)c1cncnc1"),
    ("thiophen-2-ylboronic_acid", "OB(O)c1cccs1"),
    ("thiophen-3-ylboronic_acid", "OB(O)c1ccsc1"),
    ("1-methylpyrazol-4-ylboronic_acid", "Cn1cc(cn1)B(O)O"),
)


# --------------------------------------------------------------------------------------------
# Enumeration
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Scheme:
    """One combinatorial scheme: named reagent lists, product = ``build(*reagent indices)``."""

    name: str
    blocks: tuple[tuple[tuple[str, str], ...], ...]

    @property
    def n_combinations(self) -> int:
        return int(np.prod([len(b) for b in self.blocks]))

    def decode(self, index: int) -> tuple[int, ...]:
        """Mixed-radix index -> one reagent index per block (last block fastest)."""
        return tuple(int(i) for i in np.unravel_index(index, [len(b) for b in self.blocks]))

    def product_name(self, reagents: tuple[int, ...]) -> str:
        return f"{self.name}:" + "+".join(block[i][0] for block, i in zip(self.blocks, reagents))


SCHEMES: tuple[Scheme, ...] = (
    Scheme("amide", (ACIDS, AMINES)),
    Scheme("sulfonamide", (SULFONYL_CHLORIDES, AMINES)),
    Scheme("amide3", (ACIDS, LINKERS, AMINES)),
    Scheme("suzuki_amide", (BROMOARYL_ACIDS, BORONIC_ACIDS, AMINES)),
)


def max_library_size() -> int:
    """Number of reagent combinations over all schemes (each gives one distinct product)."""
    return sum(s.n_combinations for s in SCHEMES)


class _Chemist:
    """Runs the reactions; caches parsed reagents and two-step intermediates."""

    def __init__(self) -> None:
        self.amide = rdChemReactions.ReactionFromSmarts(AMIDE_COUPLING)
        self.sulfonamide = rdChemReactions.ReactionFromSmarts(SULFONAMIDE_FORMATION)
        self.suzuki = rdChemReactions.ReactionFromSmarts(SUZUKI_COUPLING)
        for reaction in (self.amide, self.sulfonamide, self.suzuki):
            reaction.Initialize()
        self._mols: dict[str, Chem.Mol] = {}
        self._intermediates: dict[tuple[str, int, int], Chem.Mol] = {}

    def mol(self, smiles: str) -> Chem.Mol:
        if smiles not in self._mols:
            mol = Chem.MolFromSmiles(smiles)
            if mol is None:
                raise ValueError(f"invalid building block SMILES {smiles!r}")
            self._mols[smiles] = mol
        return self._mols[smiles]

    @staticmethod
    def run(reaction, first: Chem.Mol, second: Chem.Mol, what: str) -> Chem.Mol:
        outcomes = reaction.RunReactants((first, second), 1)
        if not outcomes:
            raise ValueError(f"reaction gave no product for {what}")
        product = outcomes[0][0]
        Chem.SanitizeMol(product)
        return product

    def intermediate(self, kind: str, i: int, j: int) -> Chem.Mol:
        """Linker amide (linker i + amine j) or Suzuki biaryl acid (bromide i + boronic acid j)."""
        key = (kind, i, j)
        if key not in self._intermediates:
            if kind == "linker_amide":
                mol = self.run(self.amide, self.mol(LINKERS[i][1]), self.mol(AMINES[j][1]), f"{kind} {key}")
            else:
                mol = self.run(self.suzuki, self.mol(BROMOARYL_ACIDS[i][1]), self.mol(BORONIC_ACIDS[j][1]),
                               f"{kind} {key}")
            self._intermediates[key] = mol
        return self._intermediates[key]

    def product(self, scheme: Scheme, reagents: tuple[int, ...]) -> Chem.Mol:
        what = scheme.product_name(reagents)
        if scheme.name == "amide":
            a, n = reagents
            return self.run(self.amide, self.mol(ACIDS[a][1]), self.mol(AMINES[n][1]), what)
        if scheme.name == "sulfonamide":
            s, n = reagents
            return self.run(self.sulfonamide, self.mol(SULFONYL_CHLORIDES[s][1]), self.mol(AMINES[n][1]), what)
        if scheme.name == "amide3":
            a, linker, n = reagents
            return self.run(self.amide, self.mol(ACIDS[a][1]), self.intermediate("linker_amide", linker, n), what)
        if scheme.name == "suzuki_amide":
            b, boronic, n = reagents
            return self.run(self.amide, self.intermediate("biaryl_acid", b, boronic), self.mol(AMINES[n][1]), what)
        raise ValueError(f"unknown scheme {scheme.name!r}")


def _locate(index: int, offsets: Sequence[int]) -> tuple[Scheme, int]:
    k = int(np.searchsorted(offsets, index, side="right")) - 1
    return SCHEMES[k], index - offsets[k]


def enumerate_library(n_compounds: int, seed: int) -> pd.DataFrame:
    """First ``n_compounds`` products of a seeded random order of all reagent combinations.

    Returns DataFrame[compound_id, name, smiles] with ids ``VL-000001``..., names
    ``<scheme>:<reagent>+<reagent>...`` and unique canonical SMILES.
    Raises ValueError if ``n_compounds`` exceeds ``max_library_size()``.
    """
    maximum = max_library_size()
    if not 0 <= n_compounds <= maximum:
        raise ValueError(f"n_compounds must be between 0 and {maximum} (the building blocks make at most "
                         f"{maximum} products), got {n_compounds}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(maximum)
    offsets = np.cumsum([0] + [s.n_combinations for s in SCHEMES])[:-1]
    chemist = _Chemist()
    names: list[str] = []
    smiles: list[str] = []
    seen: set[str] = set()
    with rdBase.BlockLogs():
        for index in order:
            if len(smiles) == n_compounds:
                break
            scheme, local = _locate(int(index), offsets)
            reagents = scheme.decode(local)
            canonical = Chem.MolToSmiles(chemist.product(scheme, reagents))
            if canonical in seen:  # cannot happen with the blocks above; guarded all the same
                log.warning("duplicate product %s from %s skipped", canonical, scheme.product_name(reagents))
                continue
            seen.add(canonical)
            names.append(scheme.product_name(reagents))
            smiles.append(canonical)
    if len(smiles) < n_compounds:
        raise ValueError(f"only {len(smiles)} distinct products can be made, asked for {n_compounds}")
    width = max(6, len(str(n_compounds)))
    ids = [f"{ID_PREFIX}{i:0{width}d}" for i in range(1, n_compounds + 1)]
    return pd.DataFrame({"compound_id": ids, "name": names, "smiles": smiles})
