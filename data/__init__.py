"""Data side: ISPRS raw files and preparation, the synthetic data set, the domain registry, the
prepared-folder dataset, its uint8 cache, augmentations and loaders (import the submodules)."""
