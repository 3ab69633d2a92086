"""Data: one reader per format, one split rule, one partitioner, the sites' data.

``splits``            the names and types every data module shares (SPLITS, POOL,
                      ImageSplits, SiteData, DataFileError)
``medmnist_npz``      MedMNIST ``.npz`` files: lookup, download, shipped copy, reader
``fashion_mnist_idx`` Fashion-MNIST's idx files
``image_files``       one picture or DICOM file to pixels; ``fit_image``, the one resize
``image_folder``      ImageFolder / DICOM trees: the one split rule and reader
``datasets``          a simulation's data set by name (dispatches to the readers)
``tensors``           uint8 images to the float tensors a model takes
``partition``         disjoint parts of a labelled pool with chosen sizes and class mixes
``federation``        every simulated site's data for a federation config
``site_loader``       a deployed site's own data (imports nothing simulation-only)
"""
