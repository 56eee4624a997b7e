"""The artifact stage: publish the versioned final artifact, provenance (metadata.json), proof that the base did
not change, `lorafit verify`, and result.json. May use: errors, hashing, run_folder, config, data, model, evaluate."""
