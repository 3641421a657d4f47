//! The Remora control plane: CRD controllers, the discovery index, the derived-config stream and the mesh certificate authority.
