"""The embedded synthetic data's name lists, below every layer: the generator (federated/data.py) draws
patients' and clinicians' names from them, a run records them as the identifiers its report redacts,
and a report of a results file written before that record existed (schema 4) still redacts them."""

FIRST_NAMES = (
    "Amara Bjorn Camila Dmitri Esther Farid Greta Hiroshi Ines Jonah Keziah Lorenzo Mei Nikolai "
    "Oluwaseun Priya Quentin Rosalind Santiago Tamsin Ulrich Valentina Wendell Ximena Yusuf Zofia "
    "Anselm Beatriz Cormac Delphine Emeka Freya Gideon Hana Isidore Jovana Kofi Leonie Matteo Noor "
    "Osric Paloma Rashid Signe Tobias Ursula Vikram Wilhelmina Xavier Yara Zoltan Agnes Bastian "
    "Celeste Dario Elif Fionn Gwendolyn Hamza Ilse"
).split()
LAST_NAMES = (
    "Abernathy Bergstrom Castellanos Dubois Eriksen Fitzgerald Gallagher Haddad Ivanova Jablonski "
    "Kowalczyk Lindqvist Mahlangu Nakamura Okonkwo Petrakis Quintero Rasmussen Szabo Takahashi "
    "Uchenna Vasquez Whitcombe Xiong Yilmaz Zielinski Achterberg Brennan Carvalho Delacroix Esposito "
    "Falkenrath Grigoryan Hollis Iwasaki Jovanovic Kaminski Lombardi Moreau Novak Oyelaran Pellegrini "
    "Quist Rahimi Sorensen Thibodeaux Underwood Varga Wojcik Yamamoto Zamora Alcott Bianchi Cabrera "
    "Drummond Engstrom Ferreira"
).split()


def synthetic_names() -> list[str]:
    """Every first and last name the generator uses, sorted: what a report redacts as names."""
    return sorted(set(FIRST_NAMES) | set(LAST_NAMES))
