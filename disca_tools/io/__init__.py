"""File formats: MRC volumes and STAR particle tables in every flavour the ecosystem writes."""
